//! Daemon status: the snapshot the daemon publishes, the unix socket `watcher status` reads
//! it from, its human rendering, and a Prometheus text endpoint on loopback.
//!
//! The daemon puts a fresh [`StatusSnapshot`] into a [`tokio::sync::watch`] channel whenever
//! something changes (or on a timer); the servers here only read the latest value, so a slow
//! or stuck client never holds back the event loop.
//!
//! Socket protocol: the client connects, sends `status\n` and receives one line of JSON (a
//! [`StatusSnapshot`]); the server then closes the connection. An unknown command gets a
//! line starting with `error:`.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the daemon is doing, as of one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StatusSnapshot {
    pub pid: u32,
    pub version: String,
    pub started_unix_ms: u64,
    /// `fanotify` or `inotify`.
    pub backend: String,
    pub events_total: u64,
    pub events_per_sec: f64,
    pub overflows: u64,
    pub rescans: u64,
    pub groups: Vec<GroupStatus>,
}

/// One source root and the targets it is replicated to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GroupStatus {
    pub name: String,
    /// The source directory, for display (non-UTF-8 bytes replaced).
    pub source: String,
    pub targets: Vec<TargetStatus>,
}

/// Where one target stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TargetStatus {
    pub name: String,
    /// The destination as given (local path, `host::module`, `rsync://...`, `host:/path`).
    pub dest: String,
    pub state: TargetState,
    /// Paths marked dirty and not yet handed to rsync.
    pub dirty_paths: u64,
    /// How long the oldest change not yet synced has been waiting, if any is.
    pub oldest_unsynced_ms: Option<u64>,
    /// Paths in the rsync run under way.
    pub in_flight_paths: u64,
    pub last_sync: Option<LastSync>,
    pub consecutive_failures: u32,
    pub rsync_runs: u64,
    pub retries_total: u64,
    pub verify: Option<LastVerify>,
}

/// The state of a target.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// The first full pass has not finished yet.
    #[default]
    InitialSync,
    /// Nothing dirty and nothing in flight.
    InStep,
    /// Changes are waiting or an rsync run is under way.
    Syncing,
    /// The last run failed with a retryable error; the next one waits for the backoff.
    Retrying,
    /// A fatal rsync error stopped this target.
    Failed,
}

impl TargetState {
    /// The name used in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::InitialSync => "initial_sync",
            TargetState::InStep => "in_step",
            TargetState::Syncing => "syncing",
            TargetState::Retrying => "retrying",
            TargetState::Failed => "failed",
        }
    }

    /// The name shown to people.
    pub fn human(self) -> &'static str {
        match self {
            TargetState::InitialSync => "initial sync",
            TargetState::InStep => "in step",
            TargetState::Syncing => "syncing",
            TargetState::Retrying => "retrying",
            TargetState::Failed => "FAILED",
        }
    }

    /// Whether the target is being kept in step: not stopped, not failing.
    pub fn is_up(self) -> bool {
        !matches!(self, TargetState::Retrying | TargetState::Failed)
    }
}

/// The outcome of the last rsync run of a target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LastSync {
    pub finished_unix_ms: u64,
    pub ok: bool,
    /// rsync's exit code; `None` when it did not exit normally (signal, failed to start).
    pub code: Option<i32>,
    pub paths: u64,
    pub elapsed_ms: u64,
    /// The error (or a summary) for people; empty when there is nothing to say.
    pub detail: String,
}

/// The outcome of the last verification pass of a target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LastVerify {
    pub finished_unix_ms: u64,
    /// Paths that differed and were synced again.
    pub fixed_paths: u64,
    pub ok: bool,
}

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
/// Longest status command accepted.
const MAX_COMMAND: usize = 256;
/// Longest HTTP request head accepted.
const MAX_HTTP_HEAD: usize = 8 * 1024;
/// Longest status reply a client accepts.
const MAX_REPLY: usize = 64 * 1024 * 1024;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// Unix socket server

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
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if connections.len() >= MAX_CONNECTIONS {
                            tracing::debug!("too many status connections; closing one");
                            continue;
                        }
                        connections.spawn(answer_status(stream, rx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(path = %guard.path.display(), error = %e, "accepting on status socket");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
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

/// The JSON line for a snapshot. JSON has no NaN or infinity, so a rate that is not finite
/// goes out as 0.
fn encode_snapshot(snapshot: &StatusSnapshot) -> io::Result<String> {
    let mut line = if snapshot.events_per_sec.is_finite() {
        serde_json::to_string(snapshot)
    } else {
        serde_json::to_string(&StatusSnapshot {
            events_per_sec: 0.0,
            ..snapshot.clone()
        })
    }
    .map_err(io::Error::other)?;
    line.push('\n');
    Ok(line)
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

async fn answer_status(mut stream: tokio::net::UnixStream, rx: watch::Receiver<StatusSnapshot>) {
    let exchange = async {
        let (request, complete) =
            read_request(&mut stream, MAX_COMMAND, |b| b.contains(&b'\n')).await?;
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

// ---------------------------------------------------------------------------------------
// Human rendering

/// A duration in milliseconds, short: `250ms`, `1.2s`, `42s`, `3m`, `3m05s`, `2h07m`, `3d04h`.
pub fn format_age(ms: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 10_000 {
        return format!("{}.{}s", ms / 1000, ms % 1000 / 100);
    }
    let s = ms / 1000;
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small:02}{small_unit}")
        }
    };
    if s < MINUTE {
        format!("{s}s")
    } else if s < HOUR {
        two(s / MINUTE, "m", s % MINUTE, "s")
    } else if s < DAY {
        two(s / HOUR, "h", s % HOUR / MINUTE, "m")
    } else {
        two(s / DAY, "d", s % DAY / HOUR, "h")
    }
}

fn ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    format!(
        "{} ago",
        format_age(now_unix_ms.saturating_sub(then_unix_ms))
    )
}

fn last_sync_text(last: &LastSync, now_unix_ms: u64) -> String {
    let result = match (last.ok, last.code) {
        (true, _) => "ok".to_owned(),
        (false, Some(code)) => format!("failed, exit {code}"),
        (false, None) => "failed".to_owned(),
    };
    format!(
        "{}: {result} ({} paths, {})",
        ago(now_unix_ms, last.finished_unix_ms),
        last.paths,
        format_age(last.elapsed_ms)
    )
}

/// The status for people: a header, then a table of targets per group, then notes (errors,
/// verification results) below each table.
pub fn render(s: &StatusSnapshot, now_unix_ms: u64) -> String {
    let mut out = String::new();
    let uptime = if s.started_unix_ms == 0 {
        "-".to_owned()
    } else {
        format_age(now_unix_ms.saturating_sub(s.started_unix_ms))
    };
    let _ = writeln!(
        out,
        "watcher {}  pid {}  backend {}  up {}",
        if s.version.is_empty() {
            "?"
        } else {
            &s.version
        },
        s.pid,
        if s.backend.is_empty() {
            "?"
        } else {
            &s.backend
        },
        uptime
    );
    let _ = writeln!(
        out,
        "events {} total, {:.1}/s  overflows {}  rescans {}",
        s.events_total, s.events_per_sec, s.overflows, s.rescans
    );
    if s.groups.is_empty() {
        out.push_str("\nno source groups\n");
    }
    const HEADER: [&str; 10] = [
        "TARGET",
        "STATE",
        "DIRTY",
        "OLDEST",
        "IN FLIGHT",
        "LAST SYNC",
        "RUNS",
        "RETRIES",
        "FAILS",
        "DEST",
    ];
    // Numeric columns are right-aligned.
    const RIGHT: [bool; 10] = [
        false, false, true, true, true, false, true, true, true, false,
    ];
    for group in &s.groups {
        out.push('\n');
        if group.name.is_empty() || group.name == group.source {
            let _ = writeln!(out, "{}", printable(&group.source));
        } else {
            let _ = writeln!(
                out,
                "{}: {}",
                printable(&group.name),
                printable(&group.source)
            );
        }
        if group.targets.is_empty() {
            out.push_str("  (no targets)\n");
            continue;
        }
        let mut rows: Vec<[String; 10]> = vec![HEADER.map(str::to_owned)];
        let mut notes = Vec::new();
        for t in &group.targets {
            let name = printable(&t.name);
            rows.push([
                name.clone(),
                t.state.human().to_owned(),
                t.dirty_paths.to_string(),
                t.oldest_unsynced_ms
                    .map_or_else(|| "-".to_owned(), format_age),
                t.in_flight_paths.to_string(),
                t.last_sync
                    .as_ref()
                    .map_or_else(|| "never".to_owned(), |l| last_sync_text(l, now_unix_ms)),
                t.rsync_runs.to_string(),
                t.retries_total.to_string(),
                t.consecutive_failures.to_string(),
                printable(&t.dest),
            ]);
            if let Some(last) = &t.last_sync
                && !last.detail.is_empty()
                && (!last.ok || t.state == TargetState::Failed)
            {
                notes.push(format!("{name}: {}", one_line(&last.detail)));
            }
            if let Some(v) = &t.verify {
                notes.push(format!(
                    "{name}: verified {}: {}, {} paths fixed",
                    ago(now_unix_ms, v.finished_unix_ms),
                    if v.ok { "ok" } else { "failed" },
                    v.fixed_paths
                ));
            }
        }
        let mut widths = [0usize; 10];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = String::from(" ");
            for (i, cell) in row.iter().enumerate() {
                line.push(' ');
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else if RIGHT[i] {
                    let _ = write!(line, "{cell:>w$} ", w = widths[i]);
                } else {
                    let _ = write!(line, "{cell:<w$} ", w = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for note in notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

/// Multi-line text (rsync's stderr, say) folded onto one line.
fn one_line(text: &str) -> String {
    let joined = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    printable(&joined)
}

/// `text` with control characters escaped, so a name cannot break the layout or send
/// escape sequences to the terminal.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Prometheus metrics

/// A label value escaped for the Prometheus text format: `\`, `"` and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value in the Prometheus text format.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The snapshot in the Prometheus text exposition format (version 0.0.4).
pub fn render_metrics(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "watcher_info",
        "gauge",
        "Version and change-capture backend of the daemon.",
    );
    let _ = writeln!(
        out,
        "watcher_info{{version=\"{}\",backend=\"{}\"}} 1",
        escape_label(&s.version),
        escape_label(&s.backend)
    );
    let globals: [(&str, &str, &str, f64); 5] = [
        (
            "watcher_start_time_seconds",
            "gauge",
            "Start time of the daemon, seconds since the Unix epoch.",
            s.started_unix_ms as f64 / 1000.0,
        ),
        (
            "watcher_events_total",
            "counter",
            "Change events read from the backend.",
            s.events_total as f64,
        ),
        (
            "watcher_events_per_second",
            "gauge",
            "Recent rate of change events.",
            s.events_per_sec,
        ),
        (
            "watcher_overflows_total",
            "counter",
            "Event queue overflows (each one triggers a full pass).",
            s.overflows as f64,
        ),
        (
            "watcher_rescans_total",
            "counter",
            "Subtrees rescanned.",
            s.rescans as f64,
        ),
    ];
    for (name, kind, help, value) in globals {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {}", format_value(value));
    }

    type Sample = fn(&TargetStatus) -> Option<f64>;
    let per_target: [(&str, &str, &str, Sample); 9] = [
        (
            "watcher_dirty_paths",
            "gauge",
            "Paths changed and not yet handed to rsync.",
            |t| Some(t.dirty_paths as f64),
        ),
        (
            "watcher_in_flight_paths",
            "gauge",
            "Paths in the rsync run under way.",
            |t| Some(t.in_flight_paths as f64),
        ),
        (
            "watcher_oldest_unsynced_seconds",
            "gauge",
            "Age of the oldest change not yet on the target (0 when there is none).",
            |t| Some(t.oldest_unsynced_ms.unwrap_or(0) as f64 / 1000.0),
        ),
        (
            "watcher_rsync_runs_total",
            "counter",
            "rsync runs for the target.",
            |t| Some(t.rsync_runs as f64),
        ),
        (
            "watcher_sync_retries_total",
            "counter",
            "Batches retried after a failed rsync run.",
            |t| Some(t.retries_total as f64),
        ),
        (
            "watcher_sync_failures_consecutive",
            "gauge",
            "Failed rsync runs since the last successful one.",
            |t| Some(f64::from(t.consecutive_failures)),
        ),
        (
            "watcher_last_sync_success",
            "gauge",
            "Whether the last rsync run succeeded (absent before the first run).",
            |t| t.last_sync.as_ref().map(|l| if l.ok { 1.0 } else { 0.0 }),
        ),
        (
            "watcher_last_sync_timestamp_seconds",
            "gauge",
            "When the last rsync run finished, seconds since the Unix epoch.",
            |t| {
                t.last_sync
                    .as_ref()
                    .map(|l| l.finished_unix_ms as f64 / 1000.0)
            },
        ),
        (
            "watcher_target_up",
            "gauge",
            "1 while the target is kept in step, 0 while it is retrying or has failed.",
            |t| Some(if t.state.is_up() { 1.0 } else { 0.0 }),
        ),
    ];
    for (name, kind, help, sample) in per_target {
        family(&mut out, name, kind, help);
        for group in &s.groups {
            let g = escape_label(&group.name);
            for t in &group.targets {
                if let Some(value) = sample(t) {
                    let _ = writeln!(
                        out,
                        "{name}{{group=\"{g}\",target=\"{}\"}} {}",
                        escape_label(&t.name),
                        format_value(value)
                    );
                }
            }
        }
    }
    family(
        &mut out,
        "watcher_target_state",
        "gauge",
        "The state of the target: 1 for the current one.",
    );
    const STATES: [TargetState; 5] = [
        TargetState::InitialSync,
        TargetState::InStep,
        TargetState::Syncing,
        TargetState::Retrying,
        TargetState::Failed,
    ];
    for group in &s.groups {
        let g = escape_label(&group.name);
        for t in &group.targets {
            let target = escape_label(&t.name);
            for state in STATES {
                let _ = writeln!(
                    out,
                    "watcher_target_state{{group=\"{g}\",target=\"{target}\",state=\"{}\"}} {}",
                    state.as_str(),
                    u8::from(t.state == state)
                );
            }
        }
    }
    out
}

/// The metrics endpoint: plain HTTP on a loopback address.
#[derive(Debug)]
pub struct MetricsListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr`, which must be a loopback address (port 0 picks a free port). Needs no
    /// runtime; [`serve`](Self::serve) does.
    pub fn bind(addr: SocketAddr) -> Result<MetricsListener, StatusError> {
        if !addr.ip().is_loopback() {
            return Err(StatusError::NotLoopback { addr });
        }
        let net_err = |action, source| StatusError::Net {
            action,
            addr,
            source,
        };
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| net_err("binding metrics endpoint on", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| net_err("configuring metrics endpoint on", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| net_err("configuring metrics endpoint on", e))?;
        Ok(MetricsListener { listener, addr })
    }

    /// The address bound (with the actual port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `GET /metrics` with the latest snapshot in `rx`. Runs until the future is
    /// dropped, or returns `Ok` once the sender has been dropped.
    pub async fn serve(self, mut rx: watch::Receiver<StatusSnapshot>) -> Result<(), StatusError> {
        let addr = self.addr;
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(|source| {
            StatusError::Net {
                action: "serving metrics on",
                addr,
                source,
            }
        })?;
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if connections.len() >= MAX_CONNECTIONS {
                            tracing::debug!("too many metrics connections; closing one");
                            continue;
                        }
                        connections.spawn(answer_http(stream, rx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "accepting on metrics endpoint");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// The HTTP response to a request head; `metrics` renders the body when it is needed.
fn http_response(head: &[u8], complete: bool, metrics: impl FnOnce() -> String) -> Vec<u8> {
    let plain = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    if !complete {
        return if head.len() >= MAX_HTTP_HEAD {
            plain(
                "431 Request Header Fields Too Large",
                "",
                "request head too large\n",
            )
        } else {
            plain("400 Bad Request", "", "incomplete request\n")
        };
    }
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let request_line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return plain("400 Bad Request", "", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return plain("400 Bad Request", "", "unsupported HTTP version\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return plain("404 Not Found", "", "not found; metrics are at /metrics\n");
    }
    match method {
        "GET" | "HEAD" => {
            let body = metrics();
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if method == "GET" {
                response.extend_from_slice(body.as_bytes());
            }
            response
        }
        _ => plain(
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            "method not allowed\n",
        ),
    }
}

async fn answer_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    rx: watch::Receiver<StatusSnapshot>,
) {
    let exchange = async {
        let (head, complete) = read_request(&mut stream, MAX_HTTP_HEAD, head_complete).await?;
        if head.is_empty() {
            return Ok(());
        }
        let response = http_response(&head, complete, || render_metrics(&rx.borrow()));
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
        Err(_) => tracing::debug!("metrics connection timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpStream};

    fn sample() -> StatusSnapshot {
        StatusSnapshot {
            pid: 4242,
            version: "0.1.0".into(),
            started_unix_ms: 1_000_000,
            backend: "fanotify".into(),
            events_total: 123_456,
            events_per_sec: 78.25,
            overflows: 2,
            rescans: 3,
            groups: vec![
                GroupStatus {
                    name: "data".into(),
                    source: "/srv/data".into(),
                    targets: vec![
                        TargetStatus {
                            name: "local".into(),
                            dest: "/backup/data".into(),
                            state: TargetState::InStep,
                            last_sync: Some(LastSync {
                                finished_unix_ms: 1_000_000 + 3_600_000 - 1_200,
                                ok: true,
                                code: Some(0),
                                paths: 17,
                                elapsed_ms: 35,
                                detail: String::new(),
                            }),
                            rsync_runs: 12,
                            verify: Some(LastVerify {
                                finished_unix_ms: 1_000_000 + 3_600_000 - 180_000,
                                fixed_paths: 0,
                                ok: true,
                            }),
                            ..TargetStatus::default()
                        },
                        TargetStatus {
                            name: "remote \"eu\"".into(),
                            dest: "backup::data".into(),
                            state: TargetState::Retrying,
                            dirty_paths: 120,
                            oldest_unsynced_ms: Some(185_000),
                            in_flight_paths: 40,
                            last_sync: Some(LastSync {
                                finished_unix_ms: 1_000_000 + 3_600_000 - 5_000,
                                ok: false,
                                code: Some(10),
                                paths: 40,
                                elapsed_ms: 2_500,
                                detail: "rsync: failed to connect\nconnection refused".into(),
                            }),
                            consecutive_failures: 2,
                            rsync_runs: 30,
                            retries_total: 4,
                            verify: None,
                        },
                    ],
                },
                GroupStatus {
                    name: "we\\ird\nname".into(),
                    source: "/srv/other".into(),
                    targets: vec![],
                },
            ],
        }
    }

    const NOW: u64 = 1_000_000 + 3_600_000;

    #[test]
    fn snapshot_json_round_trip() {
        let s = sample();
        let line = encode_snapshot(&s).unwrap();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        assert!(line.contains("\"state\":\"in_step\""), "{line}");
        assert!(line.contains("\"state\":\"retrying\""), "{line}");
        let back: StatusSnapshot = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, s);
        // Fields a peer does not know about are ignored, missing ones take defaults.
        let partial: StatusSnapshot =
            serde_json::from_str(r#"{"pid":7,"future_field":1,"groups":[{"name":"g"}]}"#).unwrap();
        assert_eq!(partial.pid, 7);
        assert_eq!(partial.groups[0].name, "g");
    }

    #[test]
    fn non_finite_rate_is_sent_as_zero() {
        let s = StatusSnapshot {
            events_per_sec: f64::NAN,
            ..sample()
        };
        let back: StatusSnapshot =
            serde_json::from_str(encode_snapshot(&s).unwrap().trim_end()).unwrap();
        assert_eq!(back.events_per_sec, 0.0);
    }

    #[test]
    fn ages() {
        for (ms, want) in [
            (0, "0ms"),
            (999, "999ms"),
            (1_000, "1.0s"),
            (1_250, "1.2s"),
            (9_999, "9.9s"),
            (10_000, "10s"),
            (59_999, "59s"),
            (60_000, "1m"),
            (180_000, "3m"),
            (185_000, "3m05s"),
            (3_600_000, "1h"),
            (7_620_000, "2h07m"),
            (86_400_000, "1d"),
            (273_600_000, "3d04h"),
        ] {
            assert_eq!(format_age(ms), want, "{ms} ms");
        }
    }

    #[test]
    fn render_sample() {
        let text = render(&sample(), NOW);
        for want in [
            "watcher 0.1.0",
            "pid 4242",
            "backend fanotify",
            "up 1h",
            "events 123456 total, 78.2/s",
            "overflows 2",
            "rescans 3",
            "data: /srv/data",
            "TARGET",
            "LAST SYNC",
            "in step",
            "1.2s ago: ok (17 paths, 35ms)",
            "/backup/data",
            "retrying",
            "3m05s",
            "5.0s ago: failed, exit 10 (40 paths, 2.5s)",
            "backup::data",
            "remote \"eu\": rsync: failed to connect | connection refused",
            "local: verified 3m ago: ok, 0 paths fixed",
            "(no targets)",
            "we\\ird\\nname: /srv/other",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Table columns line up: the DIRTY values end where the header does.
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().find(|l| l.contains("TARGET")).unwrap();
        let retrying = lines.iter().find(|l| l.contains("retrying")).unwrap();
        let end = header.find("DIRTY").unwrap() + "DIRTY".len();
        assert_eq!(&retrying[end - 3..end], "120", "{header}\n{retrying}");
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn render_empty() {
        let text = render(&StatusSnapshot::default(), NOW);
        assert!(text.contains("up -"), "{text}");
        assert!(text.contains("no source groups"), "{text}");
    }

    #[test]
    fn metrics_text() {
        let text = render_metrics(&sample());
        for want in [
            "# HELP watcher_events_total ",
            "# TYPE watcher_events_total counter\nwatcher_events_total 123456\n",
            "# TYPE watcher_overflows_total counter\nwatcher_overflows_total 2\n",
            "watcher_events_per_second 78.25\n",
            "watcher_info{version=\"0.1.0\",backend=\"fanotify\"} 1\n",
            "# TYPE watcher_dirty_paths gauge\n",
            "watcher_dirty_paths{group=\"data\",target=\"local\"} 0\n",
            "watcher_dirty_paths{group=\"data\",target=\"remote \\\"eu\\\"\"} 120\n",
            "watcher_oldest_unsynced_seconds{group=\"data\",target=\"remote \\\"eu\\\"\"} 185\n",
            "watcher_oldest_unsynced_seconds{group=\"data\",target=\"local\"} 0\n",
            "# TYPE watcher_rsync_runs_total counter\n",
            "watcher_rsync_runs_total{group=\"data\",target=\"local\"} 12\n",
            "watcher_sync_failures_consecutive{group=\"data\",target=\"remote \\\"eu\\\"\"} 2\n",
            "watcher_last_sync_success{group=\"data\",target=\"local\"} 1\n",
            "watcher_last_sync_success{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_target_up{group=\"data\",target=\"local\"} 1\n",
            "watcher_target_up{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_target_state{group=\"data\",target=\"local\",state=\"in_step\"} 1\n",
            "watcher_target_state{group=\"data\",target=\"local\",state=\"failed\"} 0\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Every family is introduced once, and its samples follow it without interruption.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(name.clone()), "{name} twice");
                current = name;
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "sample outside its family: {line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
            }
        }
    }

    #[test]
    fn label_escaping() {
        assert_eq!(escape_label("plain"), "plain");
        assert_eq!(escape_label("a\"b"), "a\\\"b");
        assert_eq!(escape_label("a\\b"), "a\\\\b");
        assert_eq!(escape_label("a\nb"), "a\\nb");
        assert_eq!(escape_label("\\\"\n"), "\\\\\\\"\\n");
        let mut s = sample();
        s.groups[0].name = "we\\ird\nname".into();
        let text = render_metrics(&s);
        assert!(
            text.contains("watcher_dirty_paths{group=\"we\\\\ird\\nname\",target=\"local\"} 0\n"),
            "{text}"
        );
        // No raw newline inside a sample line: every line is a comment or a whole sample.
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("watcher_"))
        );
    }

    #[test]
    fn metric_values() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.5), "0.5");
        assert_eq!(format_value(1e21), "1000000000000000000000");
    }

    #[test]
    fn http_responses() {
        let text = |head: &str| {
            String::from_utf8(http_response(
                head.as_bytes(),
                head_complete(head.as_bytes()),
                || "body\n".to_owned(),
            ))
            .unwrap()
        };
        let ok = text("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 5\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nbody\n"), "{ok}");
        let ok = text("GET /metrics?x=1 HTTP/1.0\n\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let head = text("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.contains("Content-Length: 5\r\n") && head.ends_with("\r\n\r\n"));
        assert!(text("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(text("GET /metricsx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(text("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        assert!(text("GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(text("GET /metrics SPDY/3\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(text("GET /metrics HTTP/1.1\r\n").starts_with("HTTP/1.1 400 "));
        let big = vec![b'a'; MAX_HTTP_HEAD];
        let resp = String::from_utf8(http_response(&big, false, String::new)).unwrap();
        assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

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

    fn http_get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn metrics_over_tcp() {
        let listener = MetricsListener::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        let (tx, rx) = watch::channel(sample());
        let server = std::thread::spawn(move || runtime().block_on(listener.serve(rx)));

        let response = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(body, render_metrics(&sample()));

        tx.send_modify(|s| s.overflows = 9);
        let response = http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            response.contains("\nwatcher_overflows_total 9\n"),
            "{response}"
        );

        let response = http_get(addr, "GET / HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 404 "), "{response}");

        drop(tx);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn metrics_refuse_non_loopback() {
        let err = MetricsListener::bind((Ipv4Addr::UNSPECIFIED, 0).into()).unwrap_err();
        assert!(matches!(err, StatusError::NotLoopback { .. }), "{err:?}");
        assert!(err.to_string().contains("0.0.0.0:0"), "{err}");
        let err = MetricsListener::bind((Ipv4Addr::new(10, 0, 0, 1), 9100).into()).unwrap_err();
        assert!(matches!(err, StatusError::NotLoopback { .. }), "{err:?}");
    }
}
