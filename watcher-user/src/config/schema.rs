//! The configuration file as written: one serde struct per TOML table, every value kept
//! with its position (`Spanned`) so that a later check can still name its line.
//!
//! Nothing here judges a value beyond its TOML type; that is [`super::validate`]'s job, so
//! the shape of the file can be read in one place.

use serde::Deserialize;
use toml::Spanned;

pub(super) const DEFAULT_STATE_DIR: &str = "/var/lib/watcher";
pub(super) const DEFAULT_STATUS_SOCKET: &str = "/run/watcher/status.sock";
pub(super) const DEFAULT_RSYNC: &str = "rsync";
pub(super) const DEFAULT_DELAY_MS: u64 = 100;
pub(super) const DEFAULT_MAX_DELAY_MS: u64 = 1_000;
pub(super) const DEFAULT_MAX_BATCH: u64 = 10_000;
pub(super) const DEFAULT_MAX_BACKLOG: u64 = 1_000_000;

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
