//! The API thread: HTTP/1.1 on a Unix socket, forwarding every request to the VM thread.
//!
//! HTTP is `tiny_http` (0.12): a small, synchronous, widely used server that listens on a Unix
//! socket itself, reads requests on per-connection threads (so a slow or stuck client cannot
//! hold up the others) and hands complete requests to one consumer. That consumer is the
//! single API thread here, which is all this API needs: the VM thread serves one request at
//! a time anyway. Heavier stacks (hyper + tokio) would bring an async runtime to a VMM that
//! has none; Cloud Hypervisor's `micro_http` is not published on crates.io.
//!
//! The API thread parses ([`super::http::parse_request`]), sends the [`ApiRequest`] through the
//! VM thread's [`RequestSender`] (channel + eventfd wake-up) and waits for the reply. It never
//! touches VM state.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::http::{self, Answer, MAX_BODY};
use super::{ApiError, ApiRequest, ApiResponse};

/// Where the API thread sends requests: the VM thread's handle (or a test double).
pub trait RequestSender: Send + 'static {
    /// Send `request` and wait for the VM thread's answer.
    fn request(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}

impl RequestSender for crate::vm::VmHandle {
    fn request(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        crate::vm::VmHandle::request(self, request)
    }
}

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process answers on the socket path.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket; it is not removed.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on API socket {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
    /// The HTTP server could not start.
    #[error("cannot start the API server on {0}: {1}")]
    Start(PathBuf, String),
    /// The API thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] io::Error),
}

/// A running API server; dropping it stops the thread and removes the socket.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Bind `path`, replacing a stale socket left by a process that died, but never a live one or
/// a file that is not a socket.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
    // The API controls the VM: only the owner may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
    Ok(listener)
}

/// Listen on `path` and serve the API on a new thread, forwarding to `sender`.
pub fn start<S: RequestSender>(path: &Path, sender: S) -> Result<ApiServer, ServerError> {
    let listener = bind(path)?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| ServerError::Start(path.to_path_buf(), e.to_string()))?;
    let server = Arc::new(server);
    let stopping = Arc::new(AtomicBool::new(false));
    let thread = {
        let server = server.clone();
        let stopping = stopping.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&server, &sender, &stopping))
            .map_err(ServerError::Thread)?
    };
    log::info!("API listening on {}", path.display());
    Ok(ApiServer {
        server,
        stopping,
        thread: Some(thread),
        path: path.to_path_buf(),
    })
}

impl ApiServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting requests, finish the one in progress, and remove the socket.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("API thread panicked");
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        // tiny_http removes the socket when its last reference goes; the thread held one.
    }
}

fn serve<S: RequestSender>(server: &tiny_http::Server, sender: &S, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        let request = match server.recv() {
            Ok(r) => r,
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(e) => {
                log::warn!("API: cannot receive a request: {e}");
                continue;
            }
        };
        handle(request, sender);
    }
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, Answer> {
    let mut body = Vec::new();
    // One byte over the limit tells "too large" from "exactly at the limit".
    let limit = MAX_BODY as u64 + 1;
    match request.as_reader().take(limit).read_to_end(&mut body) {
        Ok(_) => Ok(body),
        Err(e) => Err(http::HttpError {
            status: 400,
            message: format!("cannot read the request body: {e}"),
            allow: None,
        }
        .into()),
    }
}

fn handle<S: RequestSender>(mut request: tiny_http::Request, sender: &S) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let answer = match read_body(&mut request) {
        Err(a) => a,
        Ok(body) => match http::parse_request(&method, &url, &body) {
            Err(e) => e.into(),
            Ok(api_request) => http::answer(sender.request(api_request)),
        },
    };
    log::info!("API {method} {url} -> {}", answer.status);
    let mut response = match &answer.body {
        Some(body) => tiny_http::Response::from_string(body.clone()).boxed(),
        None => tiny_http::Response::empty(answer.status).boxed(),
    }
    .with_status_code(answer.status);
    if answer.body.is_some() {
        add_header(&mut response, "Content-Type", "application/json");
    }
    if let Some(m) = answer.allow {
        add_header(&mut response, "Allow", m.as_str());
    }
    if let Err(e) = request.respond(response) {
        log::debug!("API: client went away before the answer: {e}");
    }
}

fn add_header(response: &mut tiny_http::ResponseBox, name: &str, value: &str) {
    if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
        response.add_header(h);
    }
}
