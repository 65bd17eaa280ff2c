//! TLS set-up for STARTTLS: the listener's certificate, and the upstream
//! connector with or without certificate verification.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the listener's TLS acceptor from PEM files.
///
/// # Errors
/// When a file cannot be read, holds no certificate or key, or the key
/// does not match the certificate.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|error| {
            format!(
                "cannot read certificate file {}: {error}",
                cert_file.display()
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|error| format!("invalid certificate file {}: {error}", cert_file.display()))?;
    if certificates.is_empty() {
        return Err(format!("no certificate found in {}", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| {
        format!(
            "cannot read private key file {}: {error}",
            key_file.display()
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS set-up failed: {error}"))?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|error| {
            format!(
                "certificate {} and key {} do not fit: {error}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Builds a connector that verifies the upstream's certificate against the
/// system's trust store, or only against `ca_file` when one is given.
///
/// # Errors
/// When the CA file cannot be read or no trust anchor is found.
pub fn verifying_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let config = verifying_client_config(ca_file, "upstream.ca_file")?;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Builds a client configuration that verifies servers against the system's
/// trust store, or only against `ca_file` when one is given; `ca_key` names
/// the setting in the error when the system store is empty.
///
/// # Errors
/// When the CA file cannot be read or no trust anchor is found.
pub fn verifying_client_config(
    ca_file: Option<&Path>,
    ca_key: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for certificate in CertificateDer::pem_file_iter(path)
                .map_err(|error| format!("cannot read CA file {}: {error}", path.display()))?
            {
                let certificate = certificate
                    .map_err(|error| format!("invalid CA file {}: {error}", path.display()))?;
                roots.add(certificate).map_err(|error| {
                    format!("invalid CA certificate in {}: {error}", path.display())
                })?;
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for certificate in loaded.certs {
                // A system store may hold a few certificates rustls cannot
                // use; the others still serve.
                let _ = roots.add(certificate);
            }
        }
    }
    if roots.is_empty() {
        return Err(match ca_file {
            Some(path) => format!("no CA certificate found in {}", path.display()),
            None => format!("no trusted CA certificates found in the system store; set {ca_key}"),
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS set-up failed: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Builds a connector that encrypts without checking who the upstream is,
/// as Postfix's `smtp_tls_security_level = may` does: it protects against
/// listeners on the wire, not against an active attacker.
///
/// # Errors
/// When the TLS library cannot be set up.
pub fn opportunistic_connector() -> Result<TlsConnector, String> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS set-up failed: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts any certificate, but still checks the handshake signatures so
/// the session keys belong to the certificate presented.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TCP connection before or after STARTTLS; `T` is the TLS stream type
/// of the server or the client side.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Left in place for the moment of the TLS handshake; reads and writes
    /// fail.
    Upgrading,
}

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// Takes the plain TCP stream out for a TLS handshake, leaving
    /// `Upgrading` behind; `None` when TLS is already active.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, MaybeTls::Upgrading) {
            MaybeTls::Plain(stream) => Some(stream),
            other => {
                *self = other;
                None
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
            MaybeTls::Upgrading => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(context, bytes),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, bytes),
            MaybeTls::Upgrading => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_flush(context),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
            MaybeTls::Upgrading => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
            MaybeTls::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
