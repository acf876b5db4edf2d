//! The configuration as written: one serde struct per TOML table, every value kept with
//! its position (`Spanned`) so that a later check can still name its line.
//!
//! Nothing here judges a value beyond its TOML type; that is [`super::validate`]'s job, so
//! the shape of the file can be read in one place. `watcher sync` builds these same
//! structs from its command line (with empty spans) and so goes through the same checks;
//! that is why paths and rsync arguments are held as OS strings, which a command line
//! need not spell in UTF-8 (a TOML file always does).

use std::ffi::OsString;
use std::path::PathBuf;

use serde::Deserialize;
pub use toml::Spanned;

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
    /// `sync.one_file_system`, `--one-file-system`.
    pub const ONE_FILE_SYSTEM: bool = false;
    /// `sync.initial_sync`, `--no-initial-sync`.
    pub const INITIAL_SYNC: bool = true;
    /// `sync.target.max_backlog`: dirty paths held before subtrees are folded.
    pub const MAX_BACKLOG: usize = 1_000_000;
}

/// A TOML string held as OS bytes: a destination or an rsync argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsText(pub OsString);

impl<'de> Deserialize<'de> for OsText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|s| OsText(s.into()))
    }
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    #[serde(default)]
    pub daemon: Option<RawDaemon>,
    #[serde(default)]
    pub sync: Vec<Spanned<RawGroup>>,
}

/// The `[daemon]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub backend: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<PathBuf>>,
    pub status_socket: Option<Spanned<PathBuf>>,
    pub metrics: Option<Spanned<String>>,
    pub metrics_allow_remote: Option<bool>,
    pub rsync: Option<Spanned<PathBuf>>,
    pub ebpf_probes: Option<Spanned<String>>,
    pub ebpf_ringbuf_bytes: Option<Spanned<i64>>,
    pub ebpf_kernel_filter: Option<bool>,
    /// Most rsync runs at once, over every target.
    pub max_processes: Option<Spanned<i64>>,
}

/// A `_ms` key: milliseconds, or a string with a unit (`"100ms"`, `"1s"`, `"6h"`).
/// Negative numbers pass through for the range check to report.
fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Spanned<i64>>, D::Error> {
    struct Millis(i64);
    impl<'de> Deserialize<'de> for Millis {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Millis;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("milliseconds or a duration with a unit (100ms, 1s, 6h)")
                }
                fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Millis, E> {
                    Ok(Millis(n))
                }
                fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Millis, E> {
                    Ok(Millis(i64::try_from(n).unwrap_or(i64::MAX)))
                }
                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Millis, E> {
                    crate::cli::parse_millis(s)
                        .map(|ms| Millis(i64::try_from(ms).unwrap_or(i64::MAX)))
                        .map_err(|_| {
                            E::custom(format!(
                                "expected milliseconds or a duration such as \"100ms\" or \"1s\", got {s:?}"
                            ))
                        })
                }
            }
            d.deserialize_any(Visitor)
        }
    }
    let value = Spanned::<Millis>::deserialize(d)?;
    let span = value.span();
    Ok(Some(Spanned::new(span, value.into_inner().0)))
}

/// A group's `delete` as written: a boolean or a word, checked in `validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawDelete {
    Bool(bool),
    Word(String),
}

impl<'de> Deserialize<'de> for RawDelete {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDelete;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false, \"startup\" or \"running\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<RawDelete, E> {
                Ok(RawDelete::Bool(b))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawDelete, E> {
                Ok(RawDelete::Word(s.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A `[[sync]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub name: Option<Spanned<String>>,
    pub source: Spanned<PathBuf>,
    /// rsync include patterns, checked before every exclude.
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
    /// A file of more exclude patterns, one per line (`#` and `;` start comments).
    pub exclude_from: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub rsync_args: Vec<Spanned<OsText>>,
    pub hard_links: Option<bool>,
    pub one_file_system: Option<bool>,
    #[serde(default, deserialize_with = "millis")]
    pub delay_ms: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "millis")]
    pub max_delay_ms: Option<Spanned<i64>>,
    pub max_batch: Option<Spanned<i64>>,
    pub initial_sync: Option<bool>,
    /// `true`, `false`, `"startup"` or `"running"`.
    pub delete: Option<Spanned<RawDelete>>,
    pub verify_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub target: Vec<Spanned<RawTarget>>,
}

/// A `[[sync.target]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: Option<Spanned<String>>,
    pub dest: Spanned<OsText>,
    pub password_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub rsync_args: Vec<Spanned<OsText>>,
    pub ssh: Option<Spanned<Vec<String>>>,
    pub max_backlog: Option<Spanned<i64>>,
    /// A command run after each batch that landed, program first.
    pub post_sync: Option<Spanned<Vec<String>>>,
}
