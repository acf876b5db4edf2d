//! Daemon status: the snapshot the daemon publishes, the unix socket `watcher status` reads
//! it from, its human rendering, and a Prometheus text endpoint on loopback.
//!
//! The daemon puts a fresh [`StatusSnapshot`] into a [`tokio::sync::watch`] channel whenever
//! something changes (or on a timer); the servers here only read the latest value, so a slow
//! or stuck client never holds back the event loop.
//!
//! The pieces, each in its own module:
//!
//! - `snapshot`: the [`StatusSnapshot`] types and their JSON line;
//! - `socket`: the socket server ([`StatusSocket`]) and the client ([`query`]), and the
//!   protocol between them;
//! - `render`: the text `watcher status` prints ([`render()`]);
//! - `metrics`: the Prometheus text ([`render_metrics`]) and its HTTP endpoint
//!   ([`MetricsListener`]).
//!
//! This module holds what the two servers share: the error type, the limits every connection
//! is held to, and the bounded request reader.

mod metrics;
mod render;
mod snapshot;
mod socket;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub use metrics::{MetricsListener, render_metrics};
pub use render::{format_age, render};
pub use snapshot::{
    GroupStatus, LastSync, LastVerify, SshConnection, StatusSnapshot, TargetState, TargetStatus,
};
pub use socket::{StatusSocket, query, serve_socket};

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
    /// The metrics endpoint is for local scrapers only.
    #[error(
        "metrics address {addr} is not a loopback address; the endpoint has no authentication, so it only listens on 127.0.0.1 or ::1"
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
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
