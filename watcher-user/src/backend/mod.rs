//! Change capture. Every backend turns kernel notifications into [`Event`]s with absolute
//! paths; nothing downstream knows which backend produced them.
//!
//! [`start`] takes one [`BackendOptions`] value and picks the backend (`auto`: fanotify
//! on every filesystem it can mark, inotify over the rest, `hybrid` running both). The backends share one read loop (`read_loop`: waiting,
//! interrupted calls, draining after a stop, the daemon's own processes) and supply only
//! "read what is queued into events"; fanotify and inotify share the meaning of their
//! common event mask (`mask`). `mountinfo` reads the mount table for messages, the ebpf
//! root filter and the VFS records.

pub mod ebpf;
pub mod fanotify;
mod hybrid;
pub mod inotify;
mod mask;
mod mountinfo;
mod read_loop;
mod vanished;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::event::Event;

pub use mountinfo::{filesystem_type, remote_writers_note};

/// Which change-capture mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// fanotify on every filesystem it can mark, inotify over the places it cannot (an
    /// overlay root or mount, say), or inotify alone when fanotify is unusable.
    Auto,
    /// A filesystem-wide fanotify mark (Linux 5.9+, a filesystem that reports file handles).
    Fanotify,
    /// One inotify watch per directory: any kernel and filesystem, but start-up walks the
    /// tree and it needs one of fs.inotify.max_user_watches per directory.
    Inotify,
    /// eBPF probes on VFS functions or syscalls (any filesystem, no per-directory set-up); needs a
    /// binary built with the `ebpf` feature and CAP_BPF/CAP_PERFMON (root).
    Ebpf,
}

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A syscall failed; `call` names it, `path` what it was about.
    #[error("{call} on {path}")]
    Syscall {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel has no usable fanotify (too old, or built without it).
    #[error("fanotify is not usable on this kernel: {0}")]
    KernelUnsupported(String),
    /// Filesystem-wide marks need CAP_SYS_ADMIN.
    #[error("fanotify filesystem marks need CAP_SYS_ADMIN (run as root)")]
    NoPermission(#[source] std::io::Error),
    /// The filesystem of a source cannot report file handles.
    #[error(
        "{path} is on a filesystem of type {fstype}, which cannot report file handles to fanotify; use --backend inotify (or auto)"
    )]
    FilesystemUnsupported {
        path: PathBuf,
        fstype: String,
        #[source]
        source: std::io::Error,
    },
    /// No inotify instance could be created.
    #[error("inotify is not usable: {reason}")]
    InotifyUnavailable {
        reason: String,
        #[source]
        source: std::io::Error,
    },
    /// The tree needs more inotify watches than the user has left.
    #[error(
        "watching {roots} needs {needed} inotify watches (one per directory) but only {available} are free: fs.inotify.max_user_watches is {max} and {in_use} are in use; raise it to at least {wanted} (sysctl -w fs.inotify.max_user_watches=N), which lets this tree pin {memory}",
        wanted = .in_use.saturating_add(*.needed),
        memory = inotify::kernel_memory(.needed)
    )]
    InotifyWatchLimit {
        roots: String,
        needed: u64,
        available: u64,
        max: u64,
        in_use: u64,
    },
    /// Auto selection found neither backend usable.
    #[error("fanotify cannot be used ({fanotify}), and neither can inotify")]
    NoBackend {
        fanotify: String,
        #[source]
        inotify: Box<BackendError>,
    },
    /// The ebpf backend is not in this binary.
    #[error(
        "the ebpf backend is not built into this binary (build watcher-user with --features ebpf)"
    )]
    EbpfAbsent,
    /// The eBPF probes could not be loaded or attached.
    #[error("ebpf backend: {0}")]
    Ebpf(String),
    /// Reading events failed after start-up.
    #[error("reading events")]
    Read(#[source] std::io::Error),
}

/// Processes whose changes are not reported: the daemon itself and the rsync runs it spawned.
/// Their writes go to targets, never to sources; dropping them early avoids a feedback loop.
#[derive(Debug, Default)]
pub struct OwnPids {
    pids: std::sync::RwLock<hashbrown::HashSet<i32>>,
}

impl OwnPids {
    /// A set holding this process.
    pub fn new() -> Self {
        let me = OwnPids::default();
        me.insert(std::process::id() as i32);
        me
    }
    /// Starts ignoring `pid`.
    pub fn insert(&self, pid: i32) {
        if let Ok(mut set) = self.pids.write() {
            set.insert(pid);
        }
    }
    /// Stops ignoring `pid` (after the process exited).
    pub fn remove(&self, pid: i32) {
        if let Ok(mut set) = self.pids.write() {
            set.remove(&pid);
        }
    }
    /// A copy to consult without locking per event.
    pub fn snapshot(&self) -> hashbrown::HashSet<i32> {
        self.pids.read().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A started backend: its marks or watches are in place, so every change from now on is seen.
pub trait Backend: Send {
    /// Short name for logs and status.
    fn name(&self) -> &'static str;

    /// The name and what tells this instance's abilities apart from others of the same
    /// backend: the ebpf backend adds its probe set (`ebpf/vfs`, `ebpf/syscalls`).
    fn variant(&self) -> &'static str {
        self.name()
    }

    /// Reads events until `stop` is set, handing each read batch to `sink`. When `stop` is
    /// seen, events already queued in the kernel are drained and delivered before returning.
    /// `sink` returns false when the consumer is gone.
    fn run(
        self: Box<Self>,
        sink: &mut dyn FnMut(Vec<Event>) -> bool,
        stop: &AtomicBool,
    ) -> Result<(), BackendError>;
}

/// How to capture changes: the backend and the settings of the ebpf backend. One value is
/// handed to [`start`], nothing is kept process-wide: whatever starts a backend (the
/// daemon, `watcher watch`, a test) says what it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    pub kind: BackendKind,
    /// Used when `kind` is [`BackendKind::Ebpf`].
    pub ebpf: ebpf::EbpfOptions,
    /// Roots whose capture stops at mount points (`one_file_system`, rsync's `-x`): the
    /// filesystems mounted below them are neither marked nor followed. Every other root's
    /// nested filesystems are captured, and mounts appearing below them later followed.
    pub one_file_system: Vec<PathBuf>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            kind: BackendKind::Auto,
            ebpf: ebpf::EbpfOptions::default(),
            one_file_system: Vec::new(),
        }
    }
}

/// Starts the backend `options` name for `roots` (absolute, canonical directories).
pub fn start(
    options: &BackendOptions,
    roots: &[PathBuf],
    own_pids: Arc<OwnPids>,
) -> Result<Box<dyn Backend>, BackendError> {
    warn_remote_writers(roots, options);
    match options.kind {
        BackendKind::Fanotify => start_fanotify(options, roots, own_pids, "forced with --backend"),
        BackendKind::Inotify => start_inotify(options, roots, own_pids, "forced with --backend"),
        BackendKind::Ebpf => start_ebpf(options, roots, own_pids),
        BackendKind::Auto => match fanotify::FanotifyBackend::start_where_possible(
            roots,
            &options.one_file_system,
            own_pids.clone(),
        ) {
            Ok((backend, unmarked)) if unmarked.is_empty() => Ok(fanotify_selected(
                backend,
                "the kernel and every root's filesystem support filesystem marks",
            )),
            Ok((backend, unmarked)) if backend.marks_nothing() => {
                let why = unmarked
                    .iter()
                    .map(|u| u.why.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                start_inotify(
                    options,
                    roots,
                    own_pids,
                    &format!("fanotify unusable: {why}"),
                )
            }
            Ok((backend, unmarked)) => start_hybrid(options, backend, &unmarked, own_pids),
            // Only a missing capability falls back: other errors (a root that cannot be
            // opened, say) would fail inotify the same way.
            Err(
                e @ (BackendError::KernelUnsupported(_)
                | BackendError::NoPermission(_)
                | BackendError::FilesystemUnsupported { .. }),
            ) => {
                let why = error_chain(&e);
                start_inotify(
                    options,
                    roots,
                    own_pids,
                    &format!("fanotify unusable: {why}"),
                )
                .map_err(|inotify| BackendError::NoBackend {
                    fanotify: why,
                    inotify: Box::new(inotify),
                })
            }
            Err(e) => Err(e),
        },
    }
}

fn start_fanotify(
    options: &BackendOptions,
    roots: &[PathBuf],
    own_pids: Arc<OwnPids>,
    reason: &str,
) -> Result<Box<dyn Backend>, BackendError> {
    let backend = fanotify::FanotifyBackend::start(roots, &options.one_file_system, own_pids)?;
    Ok(fanotify_selected(backend, reason))
}

fn fanotify_selected(backend: fanotify::FanotifyBackend, reason: &str) -> Box<dyn Backend> {
    tracing::info!(
        backend = "fanotify",
        reason,
        rename_events = backend.has_rename_events(),
        "backend selected"
    );
    Box::new(backend)
}

#[cfg(feature = "ebpf")]
fn start_ebpf(
    options: &BackendOptions,
    roots: &[PathBuf],
    own_pids: Arc<OwnPids>,
) -> Result<Box<dyn Backend>, BackendError> {
    let backend =
        ebpf::EbpfBackend::start(&options.ebpf, roots, &options.one_file_system, own_pids)?;
    tracing::info!(
        backend = "ebpf",
        reason = "forced with --backend",
        probes = backend.probes(),
        "backend selected"
    );
    Ok(Box::new(backend))
}

#[cfg(not(feature = "ebpf"))]
fn start_ebpf(
    _options: &BackendOptions,
    _roots: &[PathBuf],
    _own_pids: Arc<OwnPids>,
) -> Result<Box<dyn Backend>, BackendError> {
    Err(BackendError::EbpfAbsent)
}

/// fanotify where it marks, inotify over the places it refused (see [`hybrid`]).
fn start_hybrid(
    options: &BackendOptions,
    fanotify: fanotify::FanotifyBackend,
    unmarked: &[fanotify::Unmarked],
    own_pids: Arc<OwnPids>,
) -> Result<Box<dyn Backend>, BackendError> {
    let places: Vec<PathBuf> = unmarked.iter().map(|u| u.path.clone()).collect();
    let stop_at: Vec<PathBuf> = places
        .iter()
        .filter(|p| options.one_file_system.contains(p))
        .cloned()
        .collect();
    let inotify = inotify::InotifyBackend::start(&places, &stop_at, own_pids)?;
    for u in unmarked {
        tracing::info!(
            path = %u.path.display(),
            fstype = %u.fstype,
            backend = "inotify",
            reason = %u.why,
            "place watched with inotify"
        );
    }
    tracing::info!(
        backend = "fanotify+inotify",
        reason = "fanotify marks every filesystem it can; inotify watches the places it refused",
        rename_events = fanotify.has_rename_events(),
        inotify_places = places.len(),
        watches = inotify.watches(),
        "backend selected"
    );
    Ok(Box::new(hybrid::Hybrid::new(
        vec![Box::new(fanotify), Box::new(inotify)],
        "fanotify+inotify",
    )))
}

fn start_inotify(
    options: &BackendOptions,
    roots: &[PathBuf],
    own_pids: Arc<OwnPids>,
    reason: &str,
) -> Result<Box<dyn Backend>, BackendError> {
    let backend = inotify::InotifyBackend::start(roots, &options.one_file_system, own_pids)?;
    tracing::info!(
        backend = "inotify",
        reason,
        watches = backend.watches(),
        "backend selected"
    );
    Ok(Box::new(backend))
}

/// One row of `watcher check`: can `backend` serve `path` here, and if not, why.
#[derive(Debug, Clone)]
pub struct Support {
    pub backend: &'static str,
    pub path: Option<PathBuf>,
    pub ok: bool,
    pub detail: String,
}

/// Probes every backend on this kernel and, for each path, on its filesystem. A path on a
/// network or userspace filesystem says that only local changes are seen.
pub fn check(paths: &[PathBuf]) -> Vec<Support> {
    let mut rows = fanotify::check(paths);
    rows.extend(inotify::check(paths));
    rows.extend(ebpf::check());
    for row in &mut rows {
        if let Some(note) = row
            .path
            .as_deref()
            .and_then(|p| remote_writers_note(&filesystem_type(p)))
        {
            row.detail.push_str("; ");
            row.detail.push_str(&note);
        }
    }
    rows
}

/// Warns, at start-up, about every root or filesystem below one whose changes may be made
/// where no local notification sees them.
fn warn_remote_writers(roots: &[PathBuf], options: &BackendOptions) {
    let table = mountinfo::mounts();
    for root in roots {
        let mut places: Vec<(PathBuf, String)> = mountinfo::containing(&table, root)
            .map(|m| (root.clone(), m.fstype.clone()))
            .into_iter()
            .collect();
        if !options.one_file_system.contains(root) {
            places.extend(
                mountinfo::below(&table, root).map(|m| (m.mount_point.clone(), m.fstype.clone())),
            );
        }
        for (path, fstype) in places {
            if let Some(note) = remote_writers_note(&fstype) {
                tracing::warn!(path = %path.display(), fstype = %fstype, "{note}");
            }
        }
    }
}

/// `err` and its sources, joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `path` with `name` appended, treating the empty name and "." as the directory itself.
pub(crate) fn join_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    if name.is_empty() || name == "." {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}
