//! Daemon status: the snapshot the daemon publishes, the unix socket `watcher status` reads
//! it from, its human rendering, and a Prometheus text endpoint (on loopback by default).
//!
//! The daemon puts a fresh [`StatusSnapshot`] into a [`tokio::sync::watch`] channel whenever
//! something changes (or on a timer); the servers here only read the latest value, so a slow
//! or stuck client never holds back the event loop.
//!
//! The pieces, each in its own module:
//!
//! - `snapshot`: the [`StatusSnapshot`] types and their JSON line;
//! - `histogram`: the [`Histogram`] of rsync run durations the snapshot carries;
//! - `socket`: the socket server ([`StatusSocket`]) and the client ([`query`]), and the
//!   protocol between them;
//! - `render`: the text `watcher status` prints ([`render()`]);
//! - `wait`: `watcher status --wait-in-step` ([`wait_in_step`]);
//! - `metrics`: the Prometheus text ([`render_metrics`]) and its HTTP endpoint
//!   ([`MetricsListener`]);
//! - `process`: the conventional `process_*` figures ([`ProcessStats`]), read from `/proc`.
//!
//! This module holds what the two servers share: the error type, the limits every connection
//! is held to (and which connection makes room for a new one), and the bounded request
//! reader.

mod histogram;
mod metrics;
mod process;
mod render;
mod snapshot;
mod socket;
mod wait;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::{AbortHandle, JoinSet};

pub use histogram::{Histogram, RUN_SECONDS_BOUNDS};
pub use metrics::{MetricsListener, render_metrics, render_process_metrics};
pub use process::ProcessStats;
pub use render::{format_age, render};
pub use snapshot::{
    FailingPath, Failures, GroupStatus, LastSync, LastVerify, MAX_FAILING_SHOWN, SshConnection,
    StatusSnapshot, TargetState, TargetStatus,
};
pub use socket::{StatusSocket, query, serve_socket};
pub use wait::{InStep, SETTLE, in_step, wait_in_step};

/// Why the status socket or the metrics endpoint could not be served or queried.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Another daemon answers on the socket.
    #[error("another watcher is running: {}", .path.display())]
    AlreadyRunning { path: PathBuf },
    /// Something that is not a socket is in the way; it is left alone.
    #[error("{} exists and is not a socket; remove it or choose another status socket path", .path.display())]
    NotASocket { path: PathBuf },
    /// No socket file, or nobody listening on it.
    #[error("no watcher daemon is listening on {}", .path.display())]
    NotListening {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket is only open to its owner.
    #[error("permission denied on {} (run as root)", .path.display())]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The daemon did not answer in time.
    #[error("the watcher daemon on {} did not answer within {timeout:?}", .path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    /// The daemon answered with something other than a snapshot.
    #[error("unexpected reply from the watcher daemon on {}: {reason}", .path.display())]
    BadReply { path: PathBuf, reason: String },
    /// The reply was not a snapshot this version understands.
    #[error("cannot decode the reply from the watcher daemon on {}", .path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A non-loopback metrics address the configuration did not allow.
    #[error(
        "metrics address {addr} is not a loopback address; the endpoint has no authentication, so it only listens on 127.0.0.1 or ::1 unless metrics_allow_remote = true"
    )]
    NotLoopback { addr: SocketAddr },
    /// A filesystem or socket call failed; `action` says what was being done.
    #[error("{action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Binding or serving the metrics endpoint failed.
    #[error("{action} {addr}")]
    Net {
        action: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// How long a client may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may stay connected without having sent its whole request. Scrapers and
/// `watcher status` send theirs as soon as they are connected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once. A new one beyond this replaces the oldest that is still
/// waiting for its request; when every one has sent its request, the new one is closed.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections a server is answering. Any local user may connect and send nothing;
/// such clients must not lock out a scraper or `watcher status`, so when the limit is
/// reached the oldest client that has not sent its request yet is dropped for the new one.
struct Connections {
    tasks: JoinSet<()>,
    /// Open connections, oldest first, each with whether its request has been read.
    open: VecDeque<(AbortHandle, Arc<AtomicBool>)>,
}

impl Connections {
    fn new() -> Self {
        Connections {
            tasks: JoinSet::new(),
            open: VecDeque::new(),
        }
    }

    /// Serves a new connection with `answer`, which is handed the flag to set once the
    /// request is read. Returns false when every slot is busy answering a request (the
    /// connection is then dropped).
    fn admit<F>(&mut self, answer: impl FnOnce(Arc<AtomicBool>) -> F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.open.retain(|(task, _)| !task.is_finished());
        if self.open.len() >= MAX_CONNECTIONS {
            let Some(idle) = self
                .open
                .iter()
                .position(|(_, requested)| !requested.load(Ordering::Relaxed))
            else {
                return false;
            };
            if let Some((task, _)) = self.open.remove(idle) {
                task.abort();
            }
        }
        let requested = Arc::new(AtomicBool::new(false));
        let task = self.tasks.spawn(answer(requested.clone()));
        self.open.push_back((task, requested));
        true
    }

    /// Waits for a connection to end (forever when there is none).
    async fn join_next(&mut self) {
        if self.tasks.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// [`read_request`] for at most [`IDLE_TIMEOUT`]; sets `requested` once it has read the
/// request.
async fn read_request_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    complete: impl Fn(&[u8]) -> bool,
    requested: &AtomicBool,
) -> io::Result<(Vec<u8>, bool)> {
    let read = tokio::time::timeout(IDLE_TIMEOUT, read_request(stream, limit, complete))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the idle timeout",
            )
        })??;
    requested.store(true, Ordering::Relaxed);
    Ok(read)
}

/// Reads until `complete` holds for what was read, EOF, or `limit` bytes.
/// Returns the bytes and whether `complete` held.
async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    complete: impl Fn(&[u8]) -> bool,
) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let want = chunk.len().min(limit - buf.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok((buf, false));
        }
        buf.extend_from_slice(&chunk[..n]);
        if complete(&buf) {
            return Ok((buf, true));
        }
        if buf.len() >= limit {
            return Ok((buf, false));
        }
    }
}

/// The runtime the servers' tests run them on.
#[cfg(test)]
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
