//! Test certificate authorities made with rcgen, for TLS between the test
//! client, sendguard and the recording upstream, and the stream type that
//! both of those harness peers switch to TLS on STARTTLS.
//!
//! Each `TestPki` is an independent CA with its own key, so a peer that
//! trusts one `TestPki` rejects the certificates of another. Keys are ECDSA
//! P-256 (rcgen's default). Certificates use rcgen's default validity, from
//! 1975 to 4096, so no test depends on the clock.

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ConnectionCommon, RootCertStore, ServerConfig, SideData, StreamOwned};
use tempfile::TempDir;

/// IP address put in every leaf made by `server_cert` and
/// `rustls_server_config`, so a client that connects to 127.0.0.1 by address
/// can verify the certificate.
pub const LOOPBACK_IP: &str = "127.0.0.1";

/// Counter that makes the subject of each CA in this process unique.
static NEXT_CA_SERIAL: AtomicUsize = AtomicUsize::new(1);

/// A test CA and a temporary directory for the PEM files it writes.
pub struct TestPki {
    /// Directory containing `ca.pem` and the files written by `server_cert`.
    /// It is deleted when the `TestPki` is dropped.
    pub dir: TempDir,
    /// The CA certificate, PEM-encoded.
    pub ca_cert_pem: String,
    /// Path of the file containing `ca_cert_pem`.
    pub ca_file: PathBuf,
    ca_cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Number of leaf files written so far, which keeps file names unique.
    written_leaves: AtomicUsize,
}

/// A leaf certificate and its private key.
struct Leaf {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: Vec<u8>,
}

impl TestPki {
    /// Creates a new CA with a fresh key and writes its certificate to
    /// `ca_file`.
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("sendguard-test-pki-")
            .tempdir()
            .expect("failed to create a temporary directory for the test PKI");

        let mut params = CertificateParams::new(Vec::<String>::new())
            .expect("CA parameters without subject alternative names are valid");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A distinct subject per CA, so that a verifier that trusts another
        // `TestPki` finds no issuer for this CA's leaves.
        let serial = NEXT_CA_SERIAL.fetch_add(1, Ordering::Relaxed);
        let common_name = format!("sendguard test CA {}-{serial}", std::process::id());
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("failed to generate the CA key");
        let certificate = params
            .self_signed(&key)
            .expect("failed to self-sign the CA certificate");

        let ca_cert_pem = certificate.pem();
        let ca_file = dir.path().join("ca.pem");
        fs::write(&ca_file, &ca_cert_pem)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", ca_file.display()));

        TestPki {
            dir,
            ca_cert_pem,
            ca_file,
            ca_cert_der: certificate.der().clone(),
            issuer: Issuer::new(params, key),
            written_leaves: AtomicUsize::new(0),
        }
    }

    /// Issues a server certificate for the DNS name `name` and the IP address
    /// 127.0.0.1 and writes it to two new PEM files in `dir`. Returns the
    /// path of the certificate chain (the leaf followed by the CA
    /// certificate) and the path of the PKCS#8 private key.
    pub fn server_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        self.server_cert_for(&[name, LOOPBACK_IP])
    }

    /// Like `server_cert`, but the certificate covers exactly `names` and no
    /// other name or address. Each entry that parses as an IP address becomes
    /// an IP address; every other entry becomes a DNS name.
    pub fn server_cert_for(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let leaf = self.issue_leaf(names);
        let number = self.written_leaves.fetch_add(1, Ordering::Relaxed) + 1;
        let stem = format!("{}-{number}", file_stem(names));
        let cert_file = self.dir.path().join(format!("{stem}.crt.pem"));
        let key_file = self.dir.path().join(format!("{stem}.key.pem"));

        let chain = format!("{}{}", leaf.cert_pem, self.ca_cert_pem);
        fs::write(&cert_file, chain)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", cert_file.display()));
        fs::write(&key_file, &leaf.key_pem)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", key_file.display()));
        (cert_file, key_file)
    }

    /// Builds a rustls server configuration that presents a new leaf for the
    /// DNS name `name` and the IP address 127.0.0.1, with the CA certificate
    /// in the chain.
    pub fn rustls_server_config(&self, name: &str) -> Arc<ServerConfig> {
        self.rustls_server_config_for(&[name, LOOPBACK_IP])
    }

    /// Like `rustls_server_config`, but the leaf covers exactly `names`, as
    /// in `server_cert_for`.
    pub fn rustls_server_config_for(&self, names: &[&str]) -> Arc<ServerConfig> {
        let leaf = self.issue_leaf(names);
        let chain = vec![leaf.cert_der, self.ca_cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
        let config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("rustls rejected the test server certificate or key");
        Arc::new(config)
    }

    /// Builds a rustls client configuration that trusts this CA and no other
    /// and sends no client certificate.
    pub fn rustls_client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_cert_der.clone())
            .expect("rustls rejected the test CA certificate");
        let config = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    fn issue_leaf(&self, names: &[&str]) -> Leaf {
        let subject_alt_names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(subject_alt_names)
            .unwrap_or_else(|error| panic!("invalid certificate names {names:?}: {error}"));
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];

        let key = KeyPair::generate().expect("failed to generate a leaf key");
        let certificate = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|error| panic!("failed to sign the leaf for {names:?}: {error}"));
        Leaf {
            cert_pem: certificate.pem(),
            cert_der: certificate.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// Returns the crypto provider for every configuration made here. Naming it
/// explicitly keeps the configurations working when another crate in the
/// build enables a second rustls provider.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds a file name stem from certificate names, keeping only characters
/// that are safe in a file name.
fn file_stem(names: &[&str]) -> String {
    let first = names.first().copied().unwrap_or("leaf");
    first
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The byte stream of an SMTP connection: plain TCP until STARTTLS, TLS
/// after it. `C` is `rustls::ClientConnection` or `rustls::ServerConnection`.
pub enum Transport<C> {
    Plain(TcpStream),
    Tls(Box<StreamOwned<C, TcpStream>>),
    /// Placeholder while STARTTLS moves the socket from `Plain` to `Tls`.
    /// Any I/O on it fails, which only happens after a failed handshake.
    Detached,
}

impl<C> Transport<C> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Returns the TCP socket of a plain transport. Panics on any other.
    pub fn into_plain(self) -> TcpStream {
        match self {
            Transport::Plain(socket) => socket,
            _ => panic!("STARTTLS on a transport that is not plain TCP"),
        }
    }

    fn detached_error() -> io::Error {
        io::Error::new(
            ErrorKind::NotConnected,
            "the connection is unusable after a failed TLS handshake",
        )
    }
}

impl<C, S> Read for Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(buffer),
            Transport::Tls(stream) => stream.read(buffer),
            Transport::Detached => Err(Self::detached_error()),
        }
    }
}

impl<C, S> Write for Transport<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.write(bytes),
            Transport::Tls(stream) => stream.write(bytes),
            Transport::Detached => Err(Self::detached_error()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.flush(),
            Transport::Tls(stream) => stream.flush(),
            Transport::Detached => Err(Self::detached_error()),
        }
    }
}

/// Runs the whole TLS handshake of `connection` on `socket`. Each read waits
/// at most the socket's read timeout. rustls's own errors, such as an
/// untrusted certificate, arrive as an `InvalidData` error that wraps a
/// `rustls::Error`.
pub fn complete_handshake<C, S>(connection: &mut C, socket: &mut TcpStream) -> io::Result<()>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    // While the connection is handshaking, one call reads and writes until
    // the handshake completes or fails, or the peer closes the connection.
    connection.complete_io(socket)?;
    if connection.is_handshaking() {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "the peer closed the connection during the TLS handshake",
        ));
    }
    Ok(())
}
