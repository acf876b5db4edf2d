//! Change capture. Every backend turns kernel notifications into [`Event`]s with absolute
//! paths; nothing downstream knows which backend produced them.

pub mod fanotify;
mod mountinfo;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::event::Event;

pub use mountinfo::filesystem_type;

/// Which change-capture mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The best one this kernel and filesystem support.
    Auto,
    /// A filesystem-wide fanotify mark (Linux 5.9+, a filesystem that reports file handles).
    Fanotify,
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
        "{path} is on a {fstype} filesystem, which cannot report file handles to fanotify ({source}); no fallback backend is available yet"
    )]
    FilesystemUnsupported {
        path: PathBuf,
        fstype: String,
        #[source]
        source: std::io::Error,
    },
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

    /// Reads events until `stop` is set, handing each read batch to `sink`. When `stop` is
    /// seen, events already queued in the kernel are drained and delivered before returning.
    /// `sink` returns false when the consumer is gone.
    fn run(
        self: Box<Self>,
        sink: &mut dyn FnMut(Vec<Event>) -> bool,
        stop: &AtomicBool,
    ) -> Result<(), BackendError>;
}

/// Starts the backend of `kind` for `roots` (absolute, canonical directories).
pub fn start(
    kind: BackendKind,
    roots: &[PathBuf],
    own_pids: Arc<OwnPids>,
) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Auto | BackendKind::Fanotify => {
            let backend = fanotify::FanotifyBackend::start(roots, own_pids)?;
            tracing::info!(
                backend = "fanotify",
                rename_events = backend.has_rename_events(),
                "backend selected"
            );
            Ok(Box::new(backend))
        }
    }
}

/// One row of `watcher check`: can `backend` serve `path` here, and if not, why.
#[derive(Debug, Clone)]
pub struct Support {
    pub backend: &'static str,
    pub path: Option<PathBuf>,
    pub ok: bool,
    pub detail: String,
}

/// Probes every backend on this kernel and, for each path, on its filesystem.
pub fn check(paths: &[PathBuf]) -> Vec<Support> {
    let mut rows = fanotify::check(paths);
    rows.push(Support {
        backend: "inotify",
        path: None,
        ok: false,
        detail: "not implemented yet".into(),
    });
    rows.push(Support {
        backend: "ebpf",
        path: None,
        ok: false,
        detail: "not built into this binary (no eBPF probes yet)".into(),
    });
    rows
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
