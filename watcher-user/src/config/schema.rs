//! The configuration file as written: one serde struct per TOML table, every value kept
//! with its position (`Spanned`) so that a later check can still name its line.
//!
//! Nothing here judges a value beyond its TOML type; that is [`super::validate`]'s job, so
//! the shape of the file can be read in one place.

use serde::Deserialize;
use toml::Spanned;

/// The value of every key a configuration may leave out: the one place these numbers are
/// written. `watcher sync` shows them in its `--help`, the flush policy and the daemon's
/// settings start from them.
pub mod defaults {
    use crate::backend::BackendKind;
    use crate::backend::ebpf::ProbeChoice;

    /// The configuration file `watcher run` and `watcher config check` read.
    pub const CONFIG_PATH: &str = "/etc/watcher/watcher.toml";
    /// `daemon.backend`, `--backend`.
    pub const BACKEND: BackendKind = BackendKind::Auto;
    /// `daemon.state_dir`, `--state-dir` (where the journal lives).
    pub const STATE_DIR: &str = "/var/lib/watcher";
    /// `daemon.status_socket`, `--status-socket`, `watcher status --socket`.
    pub const STATUS_SOCKET: &str = "/run/watcher/status.sock";
    /// `daemon.rsync`, `--rsync`: looked up in `PATH`.
    pub const RSYNC: &str = "rsync";
    /// `daemon.ebpf_probes`, `--ebpf-probes`.
    pub const EBPF_PROBES: ProbeChoice = ProbeChoice::Auto;
    /// `daemon.ebpf_ringbuf_bytes`, `--ebpf-ringbuf-bytes`: 16 MiB.
    pub const EBPF_RINGBUF_BYTES: u32 = crate::backend::ebpf::DEFAULT_RINGBUF_BYTES;
    /// `daemon.ebpf_kernel_filter`, `--ebpf-kernel-filter`.
    pub const EBPF_KERNEL_FILTER: bool = true;
    /// `sync.delay_ms`, `--delay`: quiet period that ends a burst.
    pub const DELAY_MS: u64 = 100;
    /// `sync.max_delay_ms`, `--max-delay`: longest a change waits while changes keep coming.
    pub const MAX_DELAY_MS: u64 = 1_000;
    /// `sync.max_batch`, `--max-batch`: paths that make a batch go at once.
    pub const MAX_BATCH: usize = 10_000;
    /// `sync.hard_links`, `--hard-links`.
    pub const HARD_LINKS: bool = false;
    /// `sync.initial_sync`, `--no-initial-sync`.
    pub const INITIAL_SYNC: bool = true;
    /// `sync.target.max_backlog`: dirty paths held before subtrees are folded.
    pub const MAX_BACKLOG: usize = 1_000_000;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) daemon: Option<RawDaemon>,
    #[serde(default)]
    pub(super) sync: Vec<Spanned<RawGroup>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) backend: Option<Spanned<String>>,
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) status_socket: Option<Spanned<String>>,
    pub(super) metrics: Option<Spanned<String>>,
    pub(super) rsync: Option<Spanned<String>>,
    pub(super) ebpf_probes: Option<Spanned<String>>,
    pub(super) ebpf_ringbuf_bytes: Option<Spanned<i64>>,
    pub(super) ebpf_kernel_filter: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: Option<Spanned<String>>,
    pub(super) source: Spanned<String>,
    #[serde(default)]
    pub(super) exclude: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) rsync_args: Vec<Spanned<String>>,
    pub(super) hard_links: Option<bool>,
    pub(super) delay_ms: Option<Spanned<i64>>,
    pub(super) max_delay_ms: Option<Spanned<i64>>,
    pub(super) max_batch: Option<Spanned<i64>>,
    pub(super) initial_sync: Option<bool>,
    pub(super) verify_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) target: Vec<Spanned<RawTarget>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) name: Option<Spanned<String>>,
    pub(super) dest: Spanned<String>,
    pub(super) password_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) rsync_args: Vec<Spanned<String>>,
    pub(super) max_backlog: Option<Spanned<i64>>,
}
