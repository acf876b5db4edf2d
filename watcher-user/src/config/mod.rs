//! The configuration file: the daemon's settings and the source trees ("sync groups") it
//! replicates, each with one or more targets.
//!
//! ```toml
//! [daemon]
//! backend = "auto"                     # "auto" | "fanotify" | "inotify" | "ebpf"
//! state_dir = "/var/lib/watcher"
//! status_socket = "/run/watcher/status.sock"
//! metrics = "127.0.0.1:9469"           # absent = no metrics endpoint
//! metrics_allow_remote = false         # true: `metrics` may be a non-loopback address
//! rsync = "rsync"
//! ebpf_probes = "auto"                 # backend "ebpf": "auto" | "vfs" | "syscalls"
//! ebpf_ringbuf_bytes = 16777216        # backend "ebpf": ring buffer size
//! ebpf_kernel_filter = true            # backend "ebpf": drop changes outside roots in the kernel
//!
//! [[sync]]
//! name = "data"                        # default: the source's last component
//! source = "/srv/data"
//! exclude = ["*.swp", ".cache/"]
//! rsync_args = ["--numeric-ids"]
//! hard_links = false
//! one_file_system = false              # true: stop at mount points (rsync -x)
//! delay_ms = 100
//! max_delay_ms = 1000
//! max_batch = 10000
//! initial_sync = true
//! verify_interval = "6h"               # absent = no periodic verify
//!
//! [[sync.target]]
//! dest = "backup1::data"
//! password_file = "/etc/watcher/backup1.pass"
//!
//! [[sync.target]]
//! dest = "/mnt/replica/data"
//! ```
//!
//! Every error names the file, the line and the key as a dotted path
//! (`/etc/watcher/watcher.toml:14: sync[0].delay_ms: expected a non-negative integer`).
//! [`parse`] checks the text and the sources on disk; [`load`] also refuses a config file
//! that others may write and password files that others may read. `watcher sync` builds
//! the same [`RawFile`] from its command line and checks it with [`from_options`]: the
//! same rules, errors naming the option instead of the line.
//!
//! The checked [`Config`] holds typed values, parsed once: targets as [`Target`]s (nothing
//! created on disk yet), excludes compiled, durations and addresses parsed, defaults
//! (from the one table, [`defaults`]) filled in. The daemon uses them as they are.
//!
//! The work is split by what changes for different reasons: `schema.rs` is the file as
//! written (serde structs, what a key may hold, the defaults), `validate.rs` the rules
//! that turn it into the checked values below, `errors.rs` how a failure is reported
//! (file, line, key) and how the parsed document is read with each value's position.

mod errors;
mod schema;
#[cfg(test)]
mod tests;
mod validate;

use std::ffi::OsString;
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::BackendKind;
use crate::filter::Excludes;
use crate::flush::FlushConfig;
use crate::target::Target;
use toml::de::{DeTable, DeValue};

pub use errors::ConfigError;
pub use schema::{OsText, RawDaemon, RawDelete, RawFile, RawGroup, RawTarget, Spanned, defaults};
use validate::{Ctx, Origin};
/// A checked configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// The `[[sync]]` groups, in file order (at least one).
    pub groups: Vec<GroupConfig>,
}

/// Settings of the daemon as a whole: the `[daemon]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Change-capture backend: `"auto"` (default), `"fanotify"`, `"inotify"` or `"ebpf"`.
    pub backend: BackendKind,
    /// Where the daemon keeps its state (default `/var/lib/watcher`).
    pub state_dir: PathBuf,
    /// Unix socket answering status queries (default `/run/watcher/status.sock`).
    pub status_socket: PathBuf,
    /// Address of the metrics endpoint; `None` = no endpoint.
    pub metrics: Option<SocketAddr>,
    /// Whether `metrics` may be other than a loopback address (the endpoint has no
    /// authentication, so this is asked for explicitly).
    pub metrics_allow_remote: bool,
    /// The rsync binary: a bare name looked up in `PATH` (default `rsync`) or an absolute path.
    pub rsync: PathBuf,
    /// The ebpf backend's probe set (`auto`: VFS probes where the kernel takes them).
    pub ebpf_probes: crate::backend::ebpf::ProbeChoice,
    /// The ebpf backend's ring buffer size in bytes.
    pub ebpf_ringbuf_bytes: u32,
    /// Whether the ebpf probes drop changes outside every root in the kernel.
    pub ebpf_kernel_filter: bool,
    /// Most rsync runs at once over every target (`max_processes`); None: one per target.
    pub max_processes: Option<usize>,
}

impl Default for DaemonConfig {
    /// The values used for keys the `[daemon]` table leaves out.
    fn default() -> Self {
        Self {
            backend: defaults::BACKEND,
            state_dir: PathBuf::from(defaults::STATE_DIR),
            status_socket: PathBuf::from(defaults::STATUS_SOCKET),
            metrics: None,
            metrics_allow_remote: false,
            rsync: PathBuf::from(defaults::RSYNC),
            ebpf_probes: defaults::EBPF_PROBES,
            ebpf_ringbuf_bytes: defaults::EBPF_RINGBUF_BYTES,
            ebpf_kernel_filter: defaults::EBPF_KERNEL_FILTER,
            max_processes: None,
        }
    }
}

/// One source tree and where it is replicated: a `[[sync]]` table.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Unique name of the group; defaults to the source path's last component.
    pub name: String,
    /// The source directory: absolute, existing, canonical.
    pub source: PathBuf,
    /// Replicas of the source (at least one), names unique within the group.
    pub targets: Vec<TargetConfig>,
    /// rsync exclude patterns (none empty), compiled for the event filter; the same
    /// strings are passed to rsync.
    pub excludes: Excludes,
    /// Extra rsync options for every target of the group; each starts with `-`.
    pub rsync_args: Vec<OsString>,
    /// Preserve hard links (`rsync -H`).
    pub hard_links: bool,
    /// Stop at mount points below the source (`rsync -x`): filesystems mounted there are
    /// neither captured nor copied.
    pub one_file_system: bool,
    /// Flush timing: `delay_ms` (100), `max_delay_ms` (1000, at least `delay_ms`) and
    /// `max_batch` (10000, at least 1).
    pub flush: FlushConfig,
    /// Run a full sync at start-up (default true).
    pub initial_sync: bool,
    /// `delete`: which rsync runs delete on the replica (default: all of them).
    pub delete: crate::rsync::DeleteMode,
    /// Interval of a periodic full verification pass; `None` = never.
    pub verify_interval: Option<Duration>,
}

/// One replica of a group's source: a `[[sync.target]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Name of the target, unique within its group; defaults to `dest`.
    pub name: String,
    /// The rsync destination: a local directory (absolute, resolved as far as it exists,
    /// not created yet), `host::module`, `rsync://...` or `host:/path` over ssh.
    pub dest: Target,
    /// rsync daemon password file (only for `host::module` and `rsync://` targets).
    pub password_file: Option<PathBuf>,
    /// Extra rsync options for this target, after the group's.
    pub rsync_args: Vec<OsString>,
    /// The ssh command for a `host:/path` target, program first (empty: `ssh`, or the
    /// `-e`/`--rsh` in `rsync_args`).
    pub ssh: Vec<OsString>,
    /// Dirty paths held for this target before subtrees are collapsed (default 1 000 000).
    pub max_backlog: usize,
    /// `post_sync`: run after each batch that landed, with its paths on stdin, program
    /// first (empty: none). See [`crate::post_sync`].
    pub post_sync: Vec<OsString>,
}

impl TargetConfig {
    /// The extra rsync arguments for this target: the group's, then `--password-file=FILE`
    /// when one is set, then the target's own.
    pub fn rsync_args(&self, group: &GroupConfig) -> Vec<OsString> {
        let mut args = group.rsync_args.clone();
        if let Some(file) = &self.password_file {
            let mut arg = OsString::from("--password-file=");
            arg.push(file.as_os_str());
            args.push(arg);
        }
        args.extend(self.rsync_args.iter().cloned());
        args
    }
}

/// Reads and checks the config file at `path`: everything [`parse`] checks, and also that
/// the file is not writable by group or others and that every password file exists, is
/// readable by its owner only and (when running as root) is owned by root, as rsync demands.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfigError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    // Checked on the open file, so the mode is that of the text read below.
    let meta = file.metadata().map_err(read_error)?;
    let mode = meta.mode() & 0o7777;
    if meta.is_file() && mode & 0o022 != 0 {
        return Err(ConfigError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    check_trusted(path, &meta)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_error)?;
    let (raw, misfits) = read_text(path, &text)?;
    let cx = Ctx {
        origin: Origin::File { path, text: &text },
    };
    let (config, password_files) = with_misfits(misfits, cx.config(&raw))?;
    let errors = password_files
        .into_iter()
        .filter_map(|(span, key, file)| {
            check_password_file(&file)
                .err()
                .map(|message| cx.error(&span, key, message))
        })
        .collect();
    match ConfigError::all(errors) {
        Some(e) => Err(e),
        None => Ok(config),
    }
}

/// Refuses a config file owned by someone other than root or this process's user, or kept
/// in a directory such a user owns or others can write to (a sticky directory owned by
/// root, like /tmp, is fine: no one else can replace a file there). Its owner could run
/// commands as root through `rsync_args` or point `--delete` anywhere.
fn check_trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), ConfigError> {
    let euid = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == euid;
    let untrusted = |reason: String| ConfigError::Untrusted {
        path: path.to_path_buf(),
        reason,
    };
    if !trusted(meta.uid()) {
        return Err(untrusted(format!(
            "it is owned by uid {}, not by root; fix it with `chown root {}`",
            meta.uid(),
            path.display()
        )));
    }
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Some(dir) = real.parent() else {
        return Ok(());
    };
    let dir_meta = std::fs::metadata(dir).map_err(|source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let dir_mode = dir_meta.mode() & 0o7777;
    if !trusted(dir_meta.uid()) {
        return Err(untrusted(format!(
            "its directory {} is owned by uid {}, not by root",
            dir.display(),
            dir_meta.uid()
        )));
    }
    let sticky = dir_mode & 0o1000 != 0 && dir_meta.uid() == 0;
    if dir_mode & 0o022 != 0 && !sticky {
        return Err(untrusted(format!(
            "its directory {} is writable by group or others (mode {dir_mode:04o}); fix it with `chmod go-w {}`",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Checks `text` as the contents of the config file `path` (named in errors). Sources must
/// exist; file permissions and password files are not looked at.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let (raw, misfits) = read_text(path, text)?;
    let cx = Ctx {
        origin: Origin::File { path, text },
    };
    with_misfits(misfits, cx.config(&raw).map(|(config, _)| config))
}

/// Checks a configuration given as the schema value itself, as `watcher sync` builds it
/// from its command line: the rules of [`load`], password files included, with each error
/// naming the option `option` gives for its key (`sync[0].max_batch` -> `--max-batch`).
pub fn from_options(raw: &RawFile, option: &dyn Fn(&str) -> String) -> Result<Config, ConfigError> {
    let cx = Ctx {
        origin: Origin::Options(option),
    };
    let (config, password_files) = cx.config(raw)?;
    for (span, key, file) in password_files {
        check_password_file(&file).map_err(|message| cx.error(&span, key, message))?;
    }
    Ok(config)
}

/// Parses `text` and reads it into the schema; a syntax error gives its line and column,
/// a value of the wrong type or an unknown or missing key its line and dotted key.
fn read_text(path: &Path, text: &str) -> Result<(RawFile, Vec<ConfigError>), ConfigError> {
    let (table, errors) = DeTable::parse_recoverable(text);
    if let Some(error) = errors.first() {
        let span = error.span().unwrap_or(0..0);
        let (line, column) = errors::position(text, span.start);
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column: Some(column),
            key: errors::syntax_error_key(table.get_ref(), text, &span).unwrap_or_default(),
            message: error.message().to_owned(),
        });
    }
    let span = table.span();
    let mut document = DeValue::Table(table.into_inner());
    let located = |misfits: Vec<errors::Misfit>| -> Vec<ConfigError> {
        misfits
            .iter()
            .map(|misfit| {
                let (span, key) = misfit.at.clone().unwrap_or((0..0, String::new()));
                ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line: errors::position(text, span.start).0,
                    column: None,
                    key,
                    message: misfit.message(),
                }
            })
            .collect()
    };
    match errors::read_all::<RawFile>(&mut document, span) {
        Ok((raw, misfits)) => Ok((raw, located(misfits))),
        Err(misfits) => Err(in_file_order(located(misfits)).expect("at least one misfit")),
    }
}

/// The checks of `checked` (run on what could be read) after the misfits found reading
/// the file: every error, in the order of their lines.
fn with_misfits<T>(
    misfits: Vec<ConfigError>,
    checked: Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    match (misfits.is_empty(), checked) {
        (true, checked) => checked,
        (false, Ok(_)) => Err(in_file_order(misfits).expect("misfits")),
        (false, Err(e)) => {
            // A key taken out is not told again as absent (`no [[sync]] groups` after
            // `sync` was a table).
            let key_of = |e: &ConfigError| match e {
                ConfigError::Invalid { key, .. } => Some(key.clone()),
                _ => None,
            };
            let taken_out: Vec<String> = misfits.iter().filter_map(key_of).collect();
            let mut all = misfits;
            let checked = match ConfigError::all(vec![e]) {
                Some(ConfigError::Several(errors)) => errors,
                Some(one) => vec![one],
                None => Vec::new(),
            };
            all.extend(checked.into_iter().filter(|e| {
                key_of(e).is_none_or(|key| {
                    !taken_out.iter().any(|out| {
                        key == *out
                            || key
                                .strip_prefix(out.as_str())
                                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
                    })
                })
            }));
            Err(in_file_order(all).expect("misfits"))
        }
    }
}

/// `errors` as one, sorted by line (stable: errors on one line keep their order).
fn in_file_order(errors: Vec<ConfigError>) -> Option<ConfigError> {
    let mut errors = match ConfigError::all(errors)? {
        ConfigError::Several(errors) => errors,
        one => return Some(one),
    };
    errors.sort_by_key(|e| match e {
        ConfigError::Invalid { line, .. } => *line,
        _ => 0,
    });
    ConfigError::all(errors)
}

/// rsync refuses a password file that others can read ("password file must not be
/// other-accessible") and, when running as root, one not owned by root. This is stricter
/// on the mode (group bits too) and says how to fix it.
fn check_password_file(file: &Path) -> Result<(), String> {
    let shown = file.display();
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("password file {shown} does not exist"));
        }
        Err(e) => return Err(format!("cannot access password file {shown}: {e}")),
    };
    if !meta.is_file() {
        return Err(format!("password file {shown} is not a regular file"));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "password file {shown} is accessible by group or others (mode {mode:04o}) and rsync refuses such a file; fix it with `chmod 600 {shown}`"
        ));
    }
    if nix::unistd::Uid::effective().is_root() && meta.uid() != 0 {
        return Err(format!(
            "password file {shown} is owned by uid {} but the daemon runs as root and rsync then demands a file owned by root; fix it with `chown root {shown}`",
            meta.uid()
        ));
    }
    Ok(())
}
