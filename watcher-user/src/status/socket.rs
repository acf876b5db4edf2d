//! The unix socket `watcher status` talks to: the daemon's server and the client.
//!
//! Protocol: the client connects, sends `status\n` and receives one line of JSON (a
//! [`StatusSnapshot`]); the server then closes the connection. An unknown command gets a line
//! starting with `error:`.
//!
//! The server owns the socket file: it is created mode 0600 (its directory 0755), a stale one
//! left by a crashed daemon is replaced, a live one or anything that is not a socket is
//! refused, and it is removed when the server stops. The client is blocking, with one timeout
//! for the whole exchange, and maps each way of failing to a [`StatusError`] that tells the
//! user what to do.

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::snapshot::{StatusSnapshot, encode_snapshot};
use super::{ACCEPT_BACKOFF, CLIENT_TIMEOUT, Connections, StatusError, read_request_within};

/// Longest status command accepted.
const MAX_COMMAND: usize = 256;
/// Longest status reply a client accepts.
const MAX_REPLY: usize = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Server

/// The bound status socket. Created by [`StatusSocket::bind`] (so errors surface at start-up)
/// and served by [`StatusSocket::serve`]. The socket file is removed when this value, or the
/// future returned by `serve`, is dropped.
#[derive(Debug)]
pub struct StatusSocket {
    listener: StdUnixListener,
    guard: SocketFileGuard,
}

/// Removes the socket file on drop, unless it has been replaced by another one meanwhile.
#[derive(Debug)]
struct SocketFileGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove status socket");
        }
    }
}

impl StatusSocket {
    /// Binds the socket at `path`, mode 0600 whatever the umask. A missing parent directory
    /// is created with mode 0755. A socket file nobody listens on (left by a daemon that
    /// crashed) is replaced; a live one is refused with [`StatusError::AlreadyRunning`], and
    /// anything that is not a socket with [`StatusError::NotASocket`].
    ///
    /// Needs no runtime; [`serve`](Self::serve) does.
    pub fn bind(path: &Path) -> Result<StatusSocket, StatusError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            ensure_dir(parent)?;
        }
        let listener = bind_replacing_stale(path)?;
        let io_err = |action, source| StatusError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        // Before anything else, so the window with umask permissions is as short as it gets.
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            let _ = std::fs::remove_file(path);
            return Err(io_err("setting mode 0600 on status socket", e));
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(io_err("reading status socket", e));
            }
        };
        let guard = SocketFileGuard {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("configuring status socket", e))?;
        Ok(StatusSocket { listener, guard })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.guard.path
    }

    /// Answers status requests with the latest value in `rx`. Runs until the future is
    /// dropped (the task aborted), or returns `Ok` once the sender has been dropped. Either
    /// way the socket file is removed.
    pub async fn serve(self, mut rx: watch::Receiver<StatusSnapshot>) -> Result<(), StatusError> {
        let StatusSocket { listener, guard } = self;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|source| StatusError::Io {
                action: "serving status socket",
                path: guard.path.clone(),
                source,
            })?;
        let mut connections = Connections::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let rx = rx.clone();
                        if !connections.admit(|requested| answer_status(stream, rx, requested)) {
                            tracing::debug!("too many status requests at once; closing a connection");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(path = %guard.path.display(), error = %e, "accepting on status socket");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                () = connections.join_next() => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        drop(listener);
        drop(guard);
        Ok(())
    }
}

/// [`StatusSocket::bind`] then [`StatusSocket::serve`]. Prefer the two steps in the daemon, so
/// a bad path or a running daemon is reported before anything else starts.
pub async fn serve_socket(
    path: &Path,
    rx: watch::Receiver<StatusSnapshot>,
) -> Result<(), StatusError> {
    StatusSocket::bind(path)?.serve(rx).await
}

/// Creates `dir` and any missing ancestors with mode 0755 (whatever the umask).
fn ensure_dir(dir: &Path) -> Result<(), StatusError> {
    let io_err = |action, path: &Path, source| StatusError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(d) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(io_err(
                    "status socket directory is not a directory:",
                    d,
                    io::Error::from(io::ErrorKind::NotADirectory),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(d),
            Err(e) => return Err(io_err("checking status socket directory", d, e)),
        }
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| io_err("setting mode 0755 on", d, e))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating status socket directory", d, e)),
        }
    }
    Ok(())
}

/// Binds `path`; a socket file left without a listener is removed and bound again.
fn bind_replacing_stale(path: &Path) -> Result<StdUnixListener, StatusError> {
    let io_err = |action, source| StatusError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut replaced = false;
    loop {
        let e = match StdUnixListener::bind(path) {
            Ok(listener) => return Ok(listener),
            Err(e) => e,
        };
        if e.kind() != io::ErrorKind::AddrInUse || replaced {
            return Err(io_err("binding status socket", e));
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            // Gone meanwhile: try again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                replaced = true;
                continue;
            }
            Err(e) => return Err(io_err("checking existing status socket", e)),
        };
        if !meta.file_type().is_socket() {
            return Err(StatusError::NotASocket {
                path: path.to_owned(),
            });
        }
        match StdUnixStream::connect(path) {
            Ok(_) => {
                return Err(StatusError::AlreadyRunning {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale status socket");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("removing stale status socket", e)),
                }
                replaced = true;
            }
            Err(e) => return Err(io_err("checking whether a daemon listens on", e)),
        }
    }
}

/// The reply to one status request line.
fn status_reply(request: &[u8], rx: &watch::Receiver<StatusSnapshot>) -> io::Result<String> {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let command = String::from_utf8_lossy(line);
    let command = command.trim();
    if command == "status" {
        let snapshot = rx.borrow().clone();
        encode_snapshot(&snapshot)
    } else {
        Ok(format!(
            "error: unknown command {command:?}; send \"status\" and a newline\n"
        ))
    }
}

async fn answer_status(
    mut stream: tokio::net::UnixStream,
    rx: watch::Receiver<StatusSnapshot>,
    requested: Arc<AtomicBool>,
) {
    let exchange = async {
        let (request, complete) =
            read_request_within(&mut stream, MAX_COMMAND, |b| b.contains(&b'\n'), &requested)
                .await?;
        if !complete && request.is_empty() {
            return Ok(());
        }
        let reply = status_reply(&request, &rx)?;
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "status connection"),
        Err(_) => tracing::debug!("status connection timed out"),
    }
}

// ---------------------------------------------------------------------------------------
// Client

/// Asks the daemon listening on `path` for its status. Blocking; `timeout` bounds the whole
/// exchange once connected (connecting to a unix socket returns at once unless the daemon's
/// accept backlog is full).
pub fn query(path: &Path, timeout: Duration) -> Result<StatusSnapshot, StatusError> {
    let deadline = Instant::now() + timeout;
    let timed_out = || StatusError::Timeout {
        path: path.to_owned(),
        timeout,
    };
    let io_err = |action, source| StatusError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|e| connect_error(path, e))?;
    // A zero timeout is refused by the socket calls.
    let per_call = |left: Duration| Some(left.max(Duration::from_millis(1)));
    stream
        .set_write_timeout(per_call(timeout))
        .map_err(|e| io_err("configuring connection to", e))?;
    if let Err(e) = stream.write_all(b"status\n") {
        return Err(if is_timeout(&e) {
            timed_out()
        } else {
            io_err("sending request to the watcher daemon on", e)
        });
    }
    let mut reply = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        stream
            .set_read_timeout(per_call(left))
            .map_err(|e| io_err("configuring connection to", e))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => return Err(io_err("reading reply from the watcher daemon on", e)),
        };
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        if reply.contains(&b'\n') {
            break;
        }
        if reply.len() > MAX_REPLY {
            return Err(StatusError::BadReply {
                path: path.to_owned(),
                reason: format!("no end of line within {MAX_REPLY} bytes"),
            });
        }
    }
    let Some(end) = reply.iter().position(|&b| b == b'\n') else {
        return Err(StatusError::BadReply {
            path: path.to_owned(),
            reason: if reply.is_empty() {
                "connection closed without a reply".to_owned()
            } else {
                "connection closed in the middle of the reply".to_owned()
            },
        });
    };
    let line = &reply[..end];
    if let Some(message) = line.strip_prefix(b"error:") {
        return Err(StatusError::BadReply {
            path: path.to_owned(),
            reason: String::from_utf8_lossy(message).trim().to_owned(),
        });
    }
    serde_json::from_slice(line).map_err(|source| StatusError::Decode {
        path: path.to_owned(),
        source,
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Maps a failed connect to what it means for the user.
fn connect_error(path: &Path, source: io::Error) -> StatusError {
    let path = path.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            StatusError::NotListening { path, source }
        }
        io::ErrorKind::PermissionDenied => StatusError::PermissionDenied { path, source },
        _ => StatusError::Io {
            action: "connecting to",
            path,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::runtime;
    use crate::status::snapshot::sample;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn socket_serves_latest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/watcher/status.sock");
        let socket = StatusSocket::bind(&path).unwrap();
        assert_eq!(socket.path(), path);
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("run")), 0o755);
        assert_eq!(mode(&dir.path().join("run/watcher")), 0o755);

        let (tx, rx) = watch::channel(sample());
        let server = std::thread::spawn(move || runtime().block_on(socket.serve(rx)));

        let got = query(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(got, sample());

        tx.send_modify(|s| s.events_total += 1);
        let got = query(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(got.events_total, sample().events_total + 1);

        // Several clients at once.
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || query(&path, Duration::from_secs(5)).map(|s| s.pid))
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), 4242);
        }

        // An unknown command gets an error line.
        let mut raw = StdUnixStream::connect(&path).unwrap();
        raw.write_all(b"bogus\n").unwrap();
        let mut reply = String::new();
        raw.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("error: unknown command"), "{reply}");

        // Dropping the sender ends the server, which removes the socket file.
        drop(tx);
        server.join().unwrap().unwrap();
        assert!(!path.exists());
        let err = query(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, StatusError::NotListening { .. }), "{err:?}");
    }

    #[test]
    fn idle_clients_do_not_lock_out_a_query() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let socket = StatusSocket::bind(&path).unwrap();
        let (tx, rx) = watch::channel(sample());
        let server = std::thread::spawn(move || runtime().block_on(socket.serve(rx)));
        let idle: Vec<StdUnixStream> = (0..3 * crate::status::MAX_CONNECTIONS)
            .map(|_| StdUnixStream::connect(&path).unwrap())
            .collect();
        let got = query(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(got.pid, 4242, "behind {} idle clients", idle.len());
        drop(idle);
        drop(tx);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn aborting_the_server_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let socket = StatusSocket::bind(&path).unwrap();
        let (_tx, rx) = watch::channel(sample());
        runtime().block_on(async {
            let task = tokio::spawn(socket.serve(rx));
            tokio::task::yield_now().await;
            assert!(path.exists());
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        });
        assert!(!path.exists());

        // Dropping a bound socket that was never served removes it too.
        let socket = StatusSocket::bind(&path).unwrap();
        assert!(path.exists());
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        drop(StdUnixListener::bind(&path).unwrap());
        assert!(path.exists(), "the file outlives its listener");
        let err = query(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, StatusError::NotListening { .. }), "{err:?}");

        let socket = StatusSocket::bind(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let (_tx, rx) = watch::channel(sample());
        let got = runtime().block_on(async {
            let server = tokio::spawn(socket.serve(rx));
            let p = path.clone();
            let got = tokio::task::spawn_blocking(move || query(&p, Duration::from_secs(5)))
                .await
                .unwrap();
            server.abort();
            got
        });
        assert_eq!(got.unwrap().pid, 4242);
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let first = StatusSocket::bind(&path).unwrap();
        let err = StatusSocket::bind(&path).unwrap_err();
        assert!(matches!(err, StatusError::AlreadyRunning { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("another watcher is running: {}", path.display())
        );
        // The refused attempt left the running one alone.
        assert!(path.exists());
        drop(first);
        assert!(!path.exists());
    }

    #[test]
    fn non_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = StatusSocket::bind(&path).unwrap_err();
        assert!(matches!(err, StatusError::NotASocket { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn query_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let err = query(&path, Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no watcher daemon is listening on {}", path.display())
        );
        let err = connect_error(&path, io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            err.to_string(),
            format!("permission denied on {} (run as root)", path.display())
        );
    }

    #[test]
    fn query_times_out_on_a_silent_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        // Connections queue in the backlog and are never answered.
        let _listener = StdUnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let err = query(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, StatusError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn query_reports_a_bad_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.sock");
        let listener = StdUnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 16];
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(b"{\"pid\": \"nope\"}\n").unwrap();
        });
        let err = query(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, StatusError::Decode { .. }), "{err:?}");
        server.join().unwrap();
    }
}
