//! A stand-in for clamd that records each INSTREAM payload and replies
//! `stream: OK`. A real clamd cannot hand back the bytes it scanned, so
//! this mock is used only where a test compares the scanned bytes. Every
//! other test uses the real clamd.
//!
//! It speaks the `z` form of VERSION, PING and INSTREAM, one command per
//! connection or many inside an IDSESSION session, with numbered replies
//! as clamd sends them there.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// 64 MiB bounds a message far beyond the test messages.
const MAX_PAYLOAD: usize = 64 << 20;

pub struct RecordingClamd {
    pub address: String,
    payloads: Arc<Mutex<Vec<Vec<u8>>>>,
    stopping: Arc<AtomicBool>,
}

impl RecordingClamd {
    pub fn start() -> RecordingClamd {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the recording clamd");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let address = listener.local_addr().expect("local address").to_string();
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let (recorded, stop) = (payloads.clone(), stopping.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let recorded = recorded.clone();
                        thread::spawn(move || serve(stream, &recorded));
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(error) => panic!("recording clamd: accept failed: {error}"),
                }
            }
        });
        RecordingClamd {
            address,
            payloads,
            stopping,
        }
    }

    /// Returns the INSTREAM payloads received so far, in order.
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.payloads.lock().expect("lock").clone()
    }
}

impl Drop for RecordingClamd {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Serves one connection: a single command, or a session of commands.
fn serve(mut stream: TcpStream, recorded: &Mutex<Vec<Vec<u8>>>) {
    stream.set_nonblocking(false).expect("blocking stream");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let Some(first) = read_command(&mut stream) else {
        return;
    };
    if first != b"zIDSESSION" {
        if let Some(reply) = run(&first, &mut stream, recorded) {
            let _ = stream.write_all(&reply);
        }
        return;
    }
    for number in 1.. {
        let Some(command) = read_command(&mut stream) else {
            return;
        };
        if command == b"zEND" {
            return;
        }
        let Some(reply) = run(&command, &mut stream, recorded) else {
            return;
        };
        let mut numbered = format!("{number}: ").into_bytes();
        numbered.extend_from_slice(&reply);
        if stream.write_all(&numbered).is_err() {
            return;
        }
    }
}

/// Reads a command up to its NUL; `None` at the end of the connection.
fn read_command(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut command = Vec::new();
    let mut byte = [0u8; 1];
    while command.len() < 64 {
        stream.read_exact(&mut byte).ok()?;
        if byte[0] == 0 {
            return Some(command);
        }
        command.push(byte[0]);
    }
    Some(command)
}

/// Runs one command and returns its reply; `None` when the connection
/// ended inside it.
fn run(command: &[u8], stream: &mut TcpStream, recorded: &Mutex<Vec<Vec<u8>>>) -> Option<Vec<u8>> {
    let reply: &[u8] = match command {
        b"zVERSION" => b"ClamAV 1.4.6/27000/recording stand-in\0",
        b"zPING" => b"PONG\0",
        b"zINSTREAM" => {
            let mut payload = Vec::new();
            while payload.len() < MAX_PAYLOAD {
                let mut length = [0u8; 4];
                stream.read_exact(&mut length).ok()?;
                let length = u32::from_be_bytes(length) as usize;
                if length == 0 {
                    break;
                }
                let mut chunk = vec![0u8; length];
                stream.read_exact(&mut chunk).ok()?;
                payload.extend_from_slice(&chunk);
            }
            recorded.lock().expect("lock").push(payload);
            b"stream: OK\0"
        }
        _ => b"UNKNOWN COMMAND\0",
    };
    Some(reply.to_vec())
}
