//! `vmm remote`: a command-line client of the API socket.
//!
//! ```text
//! vmm remote --api-socket /run/vmm.sock ping
//! vmm remote --api-socket /run/vmm.sock create vm.json
//! vmm remote --api-socket /run/vmm.sock resize --cpus 4 --memory 2G
//! ```
//! Prints the JSON answer (nothing for actions that answer 204) and exits 0; on an error
//! answer prints its JSON body to stderr and exits 1. The response head is parsed with
//! `httparse`; the request is written by hand (it is four lines).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use super::http::{Method, API_PREFIX};
use super::VmResize;

/// Errors talking to the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to {0}: {1} (is `vmm --api-socket` running?)")]
    Connect(PathBuf, #[source] io::Error),
    /// Sending or receiving failed.
    #[error("API socket I/O: {0}")]
    Io(#[from] io::Error),
    /// The server's answer is not valid HTTP.
    #[error("malformed HTTP answer: {0}")]
    Malformed(String),
    /// A file named on the command line cannot be read.
    #[error("cannot read {0}: {1}")]
    File(PathBuf, #[source] io::Error),
    /// A size on the command line is malformed.
    #[error(transparent)]
    Size(#[from] crate::config::ConfigError),
}

/// A server's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body (empty for 204).
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Largest answer head accepted.
const MAX_HEAD: usize = 16 << 10;
/// Largest answer body accepted (vm.info is a few KiB).
const MAX_ANSWER: usize = 16 << 20;

/// Send one request to the API socket and read the answer (one connection per request).
pub fn request(
    socket: &Path,
    method: Method,
    endpoint: &str,
    body: Option<&[u8]>,
) -> Result<Reply, ClientError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{} {API_PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        method.as_str(),
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_reply(&mut stream)
}

/// Read one HTTP answer from `stream`.
pub fn read_reply(stream: &mut impl Read) -> Result<Reply, ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (status, headers, head_len) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(ClientError::Malformed(
                "connection closed before the answer's head ended".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response
                    .code
                    .ok_or_else(|| ClientError::Malformed("no status code".into()))?;
                let headers = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (status, headers, len);
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(ClientError::Malformed("answer head too long".into()))
            }
            Err(e) => return Err(ClientError::Malformed(e.to_string())),
        }
    };
    let mut body = buf.split_off(head_len);
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| ClientError::Malformed("bad Content-Length".into()))?;
    match length {
        Some(len) if len > MAX_ANSWER => {
            return Err(ClientError::Malformed(format!("answer of {len} bytes")))
        }
        Some(len) => {
            while body.len() < len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(ClientError::Malformed("answer body cut short".into()));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        // 204 and other bodiless answers carry no length; the server closes after them.
        None if status == 204 || status == 304 || (100..200).contains(&status) => body.clear(),
        None => {
            stream
                .take((MAX_ANSWER - body.len().min(MAX_ANSWER)) as u64)
                .read_to_end(&mut body)?;
        }
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// `vmm remote` command line.
#[derive(Parser, Debug)]
#[command(
    name = "vmm remote",
    about = "Control a running vmm through its API socket",
    version
)]
struct RemoteCli {
    /// The vmm's API socket (`vmm --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check that the vmm answers; prints its version and pid.
    Ping,
    /// Print the VM's configuration and state.
    Info,
    /// Create a VM from a JSON configuration file (`-`: stdin).
    Create {
        /// JSON file with the VM configuration (see vmm/api/openapi.yaml, VmConfig).
        file: PathBuf,
    },
    /// Boot the created VM.
    Boot,
    /// Stop the VM if it runs and forget its configuration.
    Delete,
    /// Stop every vCPU.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Restart the guest.
    Reboot,
    /// Stop the guest (the vmm keeps running).
    Shutdown,
    /// End the vmm process (stops the VM and disconnects its devices).
    ShutdownVmm,
    /// Change the vCPU count and/or the RAM size.
    Resize {
        /// vCPUs wanted.
        #[arg(long)]
        cpus: Option<u8>,
        /// RAM wanted: a number with K/M/G/T suffix (a bare number is MiB).
        #[arg(long)]
        memory: Option<String>,
    },
}

fn read_config(file: &Path) -> Result<Vec<u8>, ClientError> {
    let mut data = Vec::new();
    let result = if file == Path::new("-") {
        io::stdin().read_to_end(&mut data)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut data))
    };
    result.map_err(|e| ClientError::File(file.to_path_buf(), e))?;
    Ok(data)
}

fn run(cli: RemoteCli) -> Result<Reply, ClientError> {
    let (method, endpoint, body) = match cli.command {
        Command::Ping => (Method::Get, "vmm.ping", None),
        Command::Info => (Method::Get, "vm.info", None),
        Command::Create { file } => (Method::Put, "vm.create", Some(read_config(&file)?)),
        Command::Boot => (Method::Put, "vm.boot", None),
        Command::Delete => (Method::Put, "vm.delete", None),
        Command::Pause => (Method::Put, "vm.pause", None),
        Command::Resume => (Method::Put, "vm.resume", None),
        Command::Reboot => (Method::Put, "vm.reboot", None),
        Command::Shutdown => (Method::Put, "vm.shutdown", None),
        Command::ShutdownVmm => (Method::Put, "vmm.shutdown", None),
        Command::Resize { cpus, memory } => {
            let resize = VmResize {
                desired_vcpus: cpus,
                desired_ram: memory
                    .as_deref()
                    .map(crate::config::parse_memory_size)
                    .transpose()?,
            };
            let body =
                serde_json::to_vec(&resize).map_err(|e| ClientError::Malformed(e.to_string()))?;
            (Method::Put, "vm.resize", Some(body))
        }
    };
    request(&cli.api_socket, method, endpoint, body.as_deref())
}

/// Entry point of `vmm remote ARGS...` (`args` without the leading `vmm remote`).
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let argv = std::iter::once("vmm remote".to_string()).chain(args);
    let cli = match RemoteCli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(reply) if (200..300).contains(&reply.status) => {
            if !reply.body.is_empty() {
                println!("{}", pretty(&reply.body));
            }
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            if reply.body.is_empty() {
                eprintln!("{{\"error\":\"HTTP status {}\"}}", reply.status);
            } else {
                eprintln!("{}", pretty(&reply.body));
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vmm remote: {e}");
            ExitCode::from(1)
        }
    }
}

/// Indented JSON when the body is JSON, the text as it is otherwise.
fn pretty(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_answers_in_pieces() {
        struct Trickle(Vec<u8>, usize);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(3).min(self.0.len() - self.1);
                buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let text = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}trailing";
        let r = read_reply(&mut Trickle(text.to_vec(), 0)).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.body, b"{\"a\": true}");
        let r = read_reply(&mut &b"HTTP/1.1 204 No Content\r\n\r\n"[..]).unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
    }

    #[test]
    fn rejects_broken_answers() {
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        ] {
            assert!(
                matches!(read_reply(&mut &bad[..]), Err(ClientError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn command_line() {
        let cli = |args: &[&str]| {
            RemoteCli::try_parse_from(std::iter::once("vmm remote").chain(args.iter().copied()))
        };
        assert!(cli(&["ping"]).is_err(), "--api-socket is required");
        assert!(cli(&["--api-socket", "/s", "frobnicate"]).is_err());
        assert!(
            cli(&["--api-socket", "/s", "create"]).is_err(),
            "FILE is required"
        );
        assert!(cli(&["--api-socket", "/s", "resize", "--cpus", "x"]).is_err());
        let c = cli(&[
            "--api-socket",
            "/s",
            "resize",
            "--cpus",
            "3",
            "--memory",
            "1G",
        ])
        .unwrap();
        assert!(matches!(c.command, Command::Resize { cpus: Some(3), .. }));
        assert_eq!(
            main([
                "--api-socket".to_string(),
                "/nonexistent/s".into(),
                "ping".into()
            ]),
            ExitCode::from(1)
        );
    }
}
