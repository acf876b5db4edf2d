//! The configuration file: the daemon's settings and the source trees ("sync groups") it
//! replicates, each with one or more targets.
//!
//! ```toml
//! [daemon]
//! backend = "auto"                     # "auto" | "fanotify" | "inotify" | "ebpf"
//! state_dir = "/var/lib/watcher"
//! status_socket = "/run/watcher/status.sock"
//! metrics = "127.0.0.1:9469"           # loopback only; absent = no metrics endpoint
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
//!
//! [[sync.target]]
//! dest = "replica@backup2:/srv/replica/data"
//! ssh = ["ssh", "-p", "2222", "-i", "/etc/watcher/id_ed25519"]   # default: ssh
//! ```
//!
//! Every error names the file, the line and the key as a dotted path
//! (`/etc/watcher/watcher.toml:14: sync[0].delay_ms: expected a non-negative integer`).
//! [`parse`] checks the text and the sources on disk; [`load`] also refuses a config file
//! that others may write and password files that others may read.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::backend::BackendKind;
use crate::flush::FlushConfig;

/// Where the daemon looks for its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/watcher/watcher.toml";

const DEFAULT_STATE_DIR: &str = "/var/lib/watcher";
const DEFAULT_STATUS_SOCKET: &str = "/run/watcher/status.sock";
const DEFAULT_RSYNC: &str = "rsync";
const DEFAULT_DELAY_MS: u64 = 100;
const DEFAULT_MAX_DELAY_MS: u64 = 1_000;
const DEFAULT_MAX_BATCH: u64 = 10_000;
const DEFAULT_MAX_BACKLOG: u64 = 1_000_000;

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
    /// Address of the metrics endpoint, always a loopback address; `None` = no endpoint.
    pub metrics: Option<SocketAddr>,
    /// The rsync binary: a bare name looked up in `PATH` (default `rsync`) or an absolute path.
    pub rsync: PathBuf,
    /// The ebpf backend's probe set (`auto`: VFS probes where the kernel takes them).
    pub ebpf_probes: crate::backend::ebpf::ProbeChoice,
    /// The ebpf backend's ring buffer size in bytes.
    pub ebpf_ringbuf_bytes: u32,
    /// Whether the ebpf probes drop changes outside every root in the kernel.
    pub ebpf_kernel_filter: bool,
}

impl Default for DaemonConfig {
    /// The values used for keys the `[daemon]` table leaves out.
    fn default() -> Self {
        Self {
            backend: BackendKind::Auto,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            status_socket: PathBuf::from(DEFAULT_STATUS_SOCKET),
            metrics: None,
            rsync: PathBuf::from(DEFAULT_RSYNC),
            ebpf_probes: crate::backend::ebpf::ProbeChoice::Auto,
            ebpf_ringbuf_bytes: crate::backend::ebpf::DEFAULT_RINGBUF_BYTES,
            ebpf_kernel_filter: true,
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
    /// rsync exclude patterns (none empty), applied by the event filter and passed to rsync.
    pub excludes: Vec<String>,
    /// Extra rsync options for every target of the group; each starts with `-`.
    pub rsync_args: Vec<OsString>,
    /// Preserve hard links (`rsync -H`).
    pub hard_links: bool,
    /// Flush timing: `delay_ms` (100), `max_delay_ms` (1000, at least `delay_ms`) and
    /// `max_batch` (10000, at least 1).
    pub flush: FlushConfig,
    /// Run a full sync at start-up (default true).
    pub initial_sync: bool,
    /// Interval of a periodic full verification pass; `None` = never.
    pub verify_interval: Option<Duration>,
}

/// One replica of a group's source: a `[[sync.target]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Name of the target, unique within its group; defaults to `dest`.
    pub name: String,
    /// The rsync destination: a local directory (absolute), `host::module`, `rsync://...`
    /// or `host:/path` over ssh.
    pub dest: OsString,
    /// rsync daemon password file (only for `host::module` and `rsync://` targets).
    pub password_file: Option<PathBuf>,
    /// Extra rsync options for this target, after the group's.
    pub rsync_args: Vec<OsString>,
    /// The ssh command for a `host:/path` target, program first (empty: `ssh`, or the
    /// `-e`/`--rsh` in `rsync_args`).
    pub ssh: Vec<OsString>,
    /// Dirty paths held for this target before subtrees are collapsed (default 1 000 000).
    pub max_backlog: usize,
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

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file {} does not exist", .path.display())]
    NotFound {
        /// The file asked for.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read config file {}", .path.display())]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is writable by group or others, who could then make the daemon copy or
    /// delete anything.
    #[error(
        "config file {} is writable by group or others (mode {mode:04o}): whoever can edit it controls what the daemon copies and deletes; fix it with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    Permissions {
        /// The config file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A syntax error, a wrong or unknown key, or a value that fails a check.
    #[error("{}", located(.path, *.line, *.column, .key, .message))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column (in characters), given for syntax errors.
        column: Option<usize>,
        /// Dotted path of the key, e.g. `sync[0].target[1].password_file`; empty when a
        /// syntax error cannot be placed under a key.
        key: String,
        /// What is wrong and, where there is one, how to fix it.
        message: String,
    },
}

fn located(path: &Path, line: usize, column: Option<usize>, key: &str, message: &str) -> String {
    let mut text = format!("{}:{line}", path.display());
    if let Some(column) = column {
        let _ = write!(text, ":{column}");
    }
    text.push_str(": ");
    if !key.is_empty() {
        text.push_str(key);
        text.push_str(": ");
    }
    text.push_str(message);
    text
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
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_error)?;
    let cx = Ctx { path, text: &text };
    let (config, password_files) = cx.config()?;
    for (span, key, file) in password_files {
        check_password_file(&file).map_err(|message| cx.error(&span, key, message))?;
    }
    Ok(config)
}

/// Checks `text` as the contents of the config file `path` (named in errors). Sources must
/// exist; file permissions and password files are not looked at.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    Ctx { path, text }.config().map(|(config, _)| config)
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

// ---------------------------------------------------------------------------------------
// The file as written, with positions.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    daemon: Option<RawDaemon>,
    #[serde(default)]
    sync: Vec<Spanned<RawGroup>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    backend: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    status_socket: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    rsync: Option<Spanned<String>>,
    ebpf_probes: Option<Spanned<String>>,
    ebpf_ringbuf_bytes: Option<Spanned<i64>>,
    ebpf_kernel_filter: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Option<Spanned<String>>,
    source: Spanned<String>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default)]
    rsync_args: Vec<Spanned<String>>,
    hard_links: Option<bool>,
    delay_ms: Option<Spanned<i64>>,
    max_delay_ms: Option<Spanned<i64>>,
    max_batch: Option<Spanned<i64>>,
    initial_sync: Option<bool>,
    verify_interval: Option<Spanned<String>>,
    #[serde(default)]
    target: Vec<Spanned<RawTarget>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<Spanned<String>>,
    dest: Spanned<String>,
    password_file: Option<Spanned<String>>,
    #[serde(default)]
    rsync_args: Vec<Spanned<String>>,
    ssh: Option<Spanned<Vec<String>>>,
    max_backlog: Option<Spanned<i64>>,
}

/// What kind of place a `dest` names, the way rsync tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DestKind {
    Local,
    /// `host::module` or `rsync://`: an rsync daemon, which may want a password.
    Daemon,
    /// `host:path`: rsync over ssh.
    Ssh,
}

fn dest_kind(dest: &str) -> DestKind {
    if dest.starts_with("rsync://") {
        return DestKind::Daemon;
    }
    let head = dest.find('/').map_or(dest, |i| &dest[..i]);
    if head.contains("::") {
        DestKind::Daemon
    } else if head.contains(':') {
        DestKind::Ssh
    } else {
        DestKind::Local
    }
}

/// A local target's directory as far as it can be resolved, for overlap checks.
struct LocalDest {
    path: PathBuf,
    span: Range<usize>,
    key: String,
}

/// Positions kept from parsing, for checks across groups.
struct GroupSpans {
    header: Range<usize>,
    name: Option<Range<usize>>,
    source: Range<usize>,
    local_dests: Vec<LocalDest>,
}

type PasswordFiles = Vec<(Range<usize>, String, PathBuf)>;

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn error(
        &self,
        span: &Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, _) = position(self.text, span.start);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column: None,
            key: key.into(),
            message: message.into(),
        }
    }

    fn config(&self) -> Result<(Config, PasswordFiles), ConfigError> {
        let raw = self.deserialize()?;
        let daemon = self.daemon(raw.daemon.as_ref())?;
        if raw.sync.is_empty() {
            return Err(self.error(
                &(0..0),
                "sync",
                "no [[sync]] groups: add one with a source and at least one [[sync.target]]",
            ));
        }
        let mut groups = Vec::with_capacity(raw.sync.len());
        let mut spans = Vec::with_capacity(raw.sync.len());
        let mut password_files = Vec::new();
        for (i, group) in raw.sync.iter().enumerate() {
            let (config, group_spans) = self.group(i, group, &mut password_files)?;
            groups.push(config);
            spans.push(group_spans);
        }
        self.across_groups(&groups, &spans)?;
        let config = Config {
            path: self.path.to_path_buf(),
            daemon,
            groups,
        };
        Ok((config, password_files))
    }

    fn deserialize(&self) -> Result<RawFile, ConfigError> {
        let (table, errors) = DeTable::parse_recoverable(self.text);
        if let Some(error) = errors.first() {
            let span = error.span().unwrap_or(0..0);
            let (line, column) = position(self.text, span.start);
            return Err(ConfigError::Invalid {
                path: self.path.to_path_buf(),
                line,
                column: Some(column),
                key: if error.message() == "duplicate key" {
                    duplicate_key(table.get_ref(), self.text, &span)
                } else {
                    key_at(table.get_ref(), &span)
                }
                .unwrap_or_default(),
                message: error.message().to_owned(),
            });
        }
        toml::from_str::<RawFile>(self.text).map_err(|error| {
            let span = error.span().unwrap_or(0..0);
            let key = key_at(table.get_ref(), &span).unwrap_or_default();
            let (key, message) = explain(key, error.message());
            self.error(&span, key, message)
        })
    }

    fn daemon(&self, raw: Option<&RawDaemon>) -> Result<DaemonConfig, ConfigError> {
        let mut config = DaemonConfig::default();
        let Some(raw) = raw else {
            return Ok(config);
        };
        if let Some(backend) = &raw.backend {
            config.backend = match backend.get_ref().as_str() {
                "auto" => BackendKind::Auto,
                "fanotify" => BackendKind::Fanotify,
                "inotify" => BackendKind::Inotify,
                "ebpf" => BackendKind::Ebpf,
                other => {
                    return Err(self.error(
                        &backend.span(),
                        "daemon.backend",
                        format!("unknown backend {other:?}, expected \"auto\", \"fanotify\", \"inotify\" or \"ebpf\""),
                    ));
                }
            };
        }
        if let Some(probes) = &raw.ebpf_probes {
            use crate::backend::ebpf::ProbeChoice;
            config.ebpf_probes = match probes.get_ref().as_str() {
                "auto" => ProbeChoice::Auto,
                "vfs" => ProbeChoice::Vfs,
                "syscalls" => ProbeChoice::Syscalls,
                other => {
                    return Err(self.error(
                        &probes.span(),
                        "daemon.ebpf_probes",
                        format!("unknown probe set {other:?}, expected \"auto\", \"vfs\" or \"syscalls\""),
                    ));
                }
            };
        }
        if let Some(bytes) = &raw.ebpf_ringbuf_bytes {
            const MAX: u64 = 1 << 30;
            let n = self.count(Some(bytes), "daemon.ebpf_ringbuf_bytes", 0, 16 << 10)?;
            if n > MAX {
                return Err(self.error(
                    &bytes.span(),
                    "daemon.ebpf_ringbuf_bytes",
                    format!("must be at most {MAX} (1 GiB), got {n}"),
                ));
            }
            config.ebpf_ringbuf_bytes = n as u32;
        }
        if let Some(on) = raw.ebpf_kernel_filter {
            config.ebpf_kernel_filter = on;
        }
        if let Some(dir) = &raw.state_dir {
            config.state_dir = self.absolute(dir, "daemon.state_dir")?;
        }
        if let Some(socket) = &raw.status_socket {
            config.status_socket = self.absolute(socket, "daemon.status_socket")?;
        }
        if let Some(metrics) = &raw.metrics {
            let addr: SocketAddr = metrics.get_ref().parse().map_err(|_| {
                self.error(
                    &metrics.span(),
                    "daemon.metrics",
                    format!(
                        "{:?} is not an address and port such as \"127.0.0.1:9469\" or \"[::1]:9469\"",
                        metrics.get_ref()
                    ),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(self.error(
                    &metrics.span(),
                    "daemon.metrics",
                    format!(
                        "{addr} is not a loopback address; the metrics endpoint has no authentication, so bind it to 127.0.0.1 or [::1]"
                    ),
                ));
            }
            config.metrics = Some(addr);
        }
        if let Some(rsync) = &raw.rsync {
            let path = Path::new(rsync.get_ref());
            let bare =
                !rsync.get_ref().is_empty() && path.components().count() == 1 && path.is_relative();
            if !bare && !path.is_absolute() {
                return Err(self.error(
                    &rsync.span(),
                    "daemon.rsync",
                    format!(
                        "{:?} must be a program name looked up in PATH or an absolute path",
                        rsync.get_ref()
                    ),
                ));
            }
            config.rsync = path.to_path_buf();
        }
        Ok(config)
    }

    fn absolute(&self, value: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let path = Path::new(value.get_ref());
        if path.is_absolute() {
            Ok(path.to_path_buf())
        } else {
            Err(self.error(
                &value.span(),
                key,
                format!("{:?} is not an absolute path", value.get_ref()),
            ))
        }
    }

    fn count(
        &self,
        value: Option<&Spanned<i64>>,
        key: &str,
        default: u64,
        min: u64,
    ) -> Result<u64, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = u64::try_from(*value.get_ref()).map_err(|_| {
            self.error(
                &value.span(),
                key,
                format!("expected a non-negative integer, got {}", value.get_ref()),
            )
        })?;
        if n < min {
            return Err(self.error(
                &value.span(),
                key,
                format!("must be at least {min}, got {n}"),
            ));
        }
        Ok(n)
    }

    fn rsync_args(
        &self,
        args: &[Spanned<String>],
        key: &str,
    ) -> Result<Vec<OsString>, ConfigError> {
        args.iter()
            .enumerate()
            .map(|(i, arg)| {
                let text = arg.get_ref();
                let key = format!("{key}[{i}]");
                if !text.starts_with('-') || text == "-" || text == "--" {
                    return Err(self.error(
                        &arg.span(),
                        key,
                        format!(
                            "{text:?} is not an rsync option; rsync would take it as another source or destination (write options with a value as \"--option=value\")"
                        ),
                    ));
                }
                if text.starts_with("--password-file") {
                    return Err(self.error(
                        &arg.span(),
                        key,
                        "set the password file with the target's password_file key, whose permissions are checked",
                    ));
                }
                Ok(OsString::from(text))
            })
            .collect()
    }

    fn group(
        &self,
        i: usize,
        raw: &Spanned<RawGroup>,
        password_files: &mut PasswordFiles,
    ) -> Result<(GroupConfig, GroupSpans), ConfigError> {
        let key = format!("sync[{i}]");
        let header = raw.span();
        let raw = raw.get_ref();

        let source = self.source(&raw.source, &format!("{key}.source"))?;
        let name = match &raw.name {
            Some(name) => {
                check_name(name.get_ref())
                    .map_err(|m| self.error(&name.span(), format!("{key}.name"), m))?;
                name.get_ref().clone()
            }
            None => Path::new(raw.source.get_ref())
                .file_name()
                .or_else(|| source.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| check_name(n).is_ok())
                .ok_or_else(|| {
                    self.error(
                        &raw.source.span(),
                        format!("{key}.source"),
                        format!(
                            "cannot name the group after source {:?}; set `name`",
                            raw.source.get_ref()
                        ),
                    )
                })?,
        };

        let mut excludes = Vec::with_capacity(raw.exclude.len());
        for (j, pattern) in raw.exclude.iter().enumerate() {
            if pattern.get_ref().is_empty() {
                return Err(self.error(
                    &pattern.span(),
                    format!("{key}.exclude[{j}]"),
                    "empty exclude pattern",
                ));
            }
            excludes.push(pattern.get_ref().clone());
        }
        let rsync_args = self.rsync_args(&raw.rsync_args, &format!("{key}.rsync_args"))?;

        let delay_key = format!("{key}.delay_ms");
        let max_delay_key = format!("{key}.max_delay_ms");
        let delay = self.count(raw.delay_ms.as_ref(), &delay_key, DEFAULT_DELAY_MS, 0)?;
        let max_delay = self.count(
            raw.max_delay_ms.as_ref(),
            &max_delay_key,
            DEFAULT_MAX_DELAY_MS,
            0,
        )?;
        let max_batch = self.count(
            raw.max_batch.as_ref(),
            &format!("{key}.max_batch"),
            DEFAULT_MAX_BATCH,
            1,
        )?;
        if max_delay < delay {
            return Err(match (&raw.max_delay_ms, &raw.delay_ms) {
                (Some(m), _) => self.error(
                    &m.span(),
                    max_delay_key,
                    format!("max_delay_ms ({max_delay}) is less than delay_ms ({delay})"),
                ),
                (None, Some(d)) => self.error(
                    &d.span(),
                    delay_key,
                    format!(
                        "delay_ms ({delay}) exceeds max_delay_ms ({max_delay}, the default); raise max_delay_ms too"
                    ),
                ),
                (None, None) => self.error(&header, key, "max_delay_ms is less than delay_ms"),
            });
        }

        let verify_interval = match &raw.verify_interval {
            None => None,
            Some(text) => {
                let vkey = format!("{key}.verify_interval");
                let interval = humantime::parse_duration(text.get_ref()).map_err(|e| {
                    self.error(
                        &text.span(),
                        vkey.clone(),
                        format!(
                            "invalid duration {:?} ({e}); write it like \"6h\" or \"30m\"",
                            text.get_ref()
                        ),
                    )
                })?;
                if interval.is_zero() {
                    return Err(self.error(
                        &text.span(),
                        vkey,
                        "must be longer than zero; leave it out for no periodic verify",
                    ));
                }
                Some(interval)
            }
        };

        if raw.target.is_empty() {
            return Err(self.error(
                &header,
                format!("{key}.target"),
                "no targets: add at least one [[sync.target]] with a dest",
            ));
        }
        let mut targets = Vec::with_capacity(raw.target.len());
        let mut local_dests = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (j, target) in raw.target.iter().enumerate() {
            let tkey = format!("{key}.target[{j}]");
            let config = self.target(
                &tkey,
                target.get_ref(),
                &source,
                &mut local_dests,
                password_files,
            )?;
            if let Some(first) = names.insert(config.name.clone(), j) {
                let (span, name_key, how) = match &target.get_ref().name {
                    Some(n) => (n.span(), format!("{tkey}.name"), "choose another name"),
                    None => (
                        target.get_ref().dest.span(),
                        format!("{tkey}.dest"),
                        "a target's name defaults to its dest; set a distinct `name`",
                    ),
                };
                return Err(self.error(
                    &span,
                    name_key,
                    format!(
                        "target name {:?} is already used by {key}.target[{first}]; {how}",
                        config.name
                    ),
                ));
            }
            targets.push(config);
        }

        let config = GroupConfig {
            name,
            source,
            targets,
            excludes,
            rsync_args,
            hard_links: raw.hard_links.unwrap_or(false),
            flush: FlushConfig {
                delay: Duration::from_millis(delay),
                max_delay: Duration::from_millis(max_delay),
                max_batch: usize::try_from(max_batch).unwrap_or(usize::MAX),
            },
            initial_sync: raw.initial_sync.unwrap_or(true),
            verify_interval,
        };
        let spans = GroupSpans {
            header,
            name: raw.name.as_ref().map(|n| n.span()),
            source: raw.source.span(),
            local_dests,
        };
        Ok((config, spans))
    }

    fn source(&self, raw: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let text = raw.get_ref();
        let path = Path::new(text);
        let fail = |message: String| self.error(&raw.span(), key, message);
        if !path.is_absolute() {
            return Err(fail(format!("source {text:?} is not an absolute path")));
        }
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!("source {text} does not exist")));
            }
            Err(e) => return Err(fail(format!("cannot access source {text}: {e}"))),
            Ok(meta) if !meta.is_dir() => {
                return Err(fail(format!("source {text} is not a directory")));
            }
            Ok(_) => {}
        }
        path.canonicalize()
            .map_err(|e| fail(format!("cannot resolve source {text}: {e}")))
    }

    fn target(
        &self,
        key: &str,
        raw: &RawTarget,
        source: &Path,
        local_dests: &mut Vec<LocalDest>,
        password_files: &mut PasswordFiles,
    ) -> Result<TargetConfig, ConfigError> {
        let dest = raw.dest.get_ref();
        let dest_key = format!("{key}.dest");
        let dest_error = |message: String| self.error(&raw.dest.span(), dest_key.clone(), message);
        if dest.is_empty() {
            return Err(dest_error("dest is empty".into()));
        }
        if dest.starts_with('-') {
            return Err(dest_error(format!(
                "dest {dest:?} starts with '-' and would be read as an rsync option"
            )));
        }
        let kind = dest_kind(dest);
        if kind == DestKind::Local {
            let path = Path::new(dest);
            if !path.is_absolute() {
                return Err(dest_error(format!(
                    "local dest {dest:?} is not an absolute path (remote targets look like host::module, rsync://host/module or host:/path)"
                )));
            }
            if let Ok(meta) = std::fs::metadata(path)
                && !meta.is_dir()
            {
                return Err(dest_error(format!(
                    "dest {dest} exists and is not a directory"
                )));
            }
            let resolved = resolve(path);
            if let Some(message) = overlap(&resolved, source) {
                return Err(dest_error(message));
            }
            local_dests.push(LocalDest {
                path: resolved,
                span: raw.dest.span(),
                key: dest_key.clone(),
            });
        }

        let name = match &raw.name {
            Some(name) if name.get_ref().is_empty() => {
                return Err(self.error(&name.span(), format!("{key}.name"), "name is empty"));
            }
            Some(name) => name.get_ref().clone(),
            None => dest.clone(),
        };

        let password_file = match &raw.password_file {
            None => None,
            Some(file) => {
                let pkey = format!("{key}.password_file");
                let why = match kind {
                    DestKind::Daemon => None,
                    DestKind::Local => Some("is a local directory"),
                    DestKind::Ssh => Some("goes over ssh, which authenticates with ssh keys"),
                };
                if let Some(why) = why {
                    return Err(self.error(
                        &file.span(),
                        pkey,
                        format!(
                            "password_file is only for rsync daemon targets (host::module or rsync://...), and {dest} {why}"
                        ),
                    ));
                }
                let path = self.absolute(file, &pkey)?;
                password_files.push((file.span(), pkey, path.clone()));
                Some(path)
            }
        };

        let rsync_args = self.rsync_args(&raw.rsync_args, &format!("{key}.rsync_args"))?;
        let ssh = match &raw.ssh {
            None => Vec::new(),
            Some(cmd) if kind != DestKind::Ssh => {
                return Err(self.error(
                    &cmd.span(),
                    format!("{key}.ssh"),
                    format!("ssh is only for ssh targets (host:/path), and {dest} is not one"),
                ));
            }
            Some(cmd) if cmd.get_ref().first().is_none_or(String::is_empty) => {
                return Err(self.error(
                    &cmd.span(),
                    format!("{key}.ssh"),
                    "expected the ssh command, program first: [\"ssh\", \"-p\", \"2222\"]",
                ));
            }
            Some(cmd) => cmd.get_ref().iter().map(OsString::from).collect(),
        };
        let max_backlog = self.count(
            raw.max_backlog.as_ref(),
            &format!("{key}.max_backlog"),
            DEFAULT_MAX_BACKLOG,
            1,
        )?;
        Ok(TargetConfig {
            name,
            dest: OsString::from(dest),
            password_file,
            rsync_args,
            ssh,
            max_backlog: usize::try_from(max_backlog).unwrap_or(usize::MAX),
        })
    }

    /// Unique group names, no shared or nested sources, no local target overlapping any
    /// source or another local target.
    fn across_groups(
        &self,
        groups: &[GroupConfig],
        spans: &[GroupSpans],
    ) -> Result<(), ConfigError> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, (group, span)) in groups.iter().zip(spans).enumerate() {
            if let Some(first) = names.insert(&group.name, i) {
                let line = position(self.text, spans[first].header.start).0;
                return Err(match &span.name {
                    Some(name) => self.error(
                        name,
                        format!("sync[{i}].name"),
                        format!(
                            "group name {:?} is already used by sync[{first}] (line {line}); choose another name",
                            group.name
                        ),
                    ),
                    None => self.error(
                        &span.source,
                        format!("sync[{i}].source"),
                        format!(
                            "group name {:?}, taken from the source's last component, is already used by sync[{first}] (line {line}); set a distinct `name`",
                            group.name
                        ),
                    ),
                });
            }
        }

        for (i, group) in groups.iter().enumerate() {
            for (first, earlier) in groups[..i].iter().enumerate() {
                let relation = if group.source == earlier.source {
                    "is also the source of"
                } else if group.source.starts_with(&earlier.source) {
                    "lies inside the source of"
                } else if earlier.source.starts_with(&group.source) {
                    "contains the source of"
                } else {
                    continue;
                };
                return Err(self.error(
                    &spans[i].source,
                    format!("sync[{i}].source"),
                    format!(
                        "{} {relation} sync[{first}] ({}); sources may not overlap, use one group with excludes instead",
                        group.source.display(),
                        earlier.source.display()
                    ),
                ));
            }
        }

        let all_dests: Vec<&LocalDest> = spans.iter().flat_map(|s| &s.local_dests).collect();
        for (n, dest) in all_dests.iter().enumerate() {
            for (i, group) in groups.iter().enumerate() {
                if let Some(message) = overlap(&dest.path, &group.source) {
                    return Err(self.error(
                        &dest.span,
                        dest.key.clone(),
                        format!("{message} (sync[{i}])"),
                    ));
                }
            }
            for earlier in &all_dests[..n] {
                if dest.path.starts_with(&earlier.path) || earlier.path.starts_with(&dest.path) {
                    return Err(self.error(
                        &dest.span,
                        dest.key.clone(),
                        format!(
                            "local target {} overlaps {} ({}); each rsync --delete would undo the other",
                            dest.path.display(),
                            earlier.key,
                            earlier.path.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Why a local target at `target` cannot serve `source`, if it cannot.
fn overlap(target: &Path, source: &Path) -> Option<String> {
    if target.starts_with(source) {
        Some(format!(
            "target {} lies inside source {}: the daemon would copy its own copies",
            target.display(),
            source.display()
        ))
    } else if source.starts_with(target) {
        Some(format!(
            "source {} lies inside target {}: syncing with --delete would remove the source",
            source.display(),
            target.display()
        ))
    } else {
        None
    }
}

/// `path` (absolute) with every existing prefix canonicalized and the rest normalized
/// lexically.
fn resolve(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    let mut exists = true;
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if exists {
                    match out.canonicalize() {
                        Ok(canonical) => out = canonical,
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    out
}

/// Group names end up in logs, metrics and file names under the state directory.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("name is empty".into())
    } else if name == "." || name == ".." || name.contains('/') {
        Err(format!(
            "name {name:?} may not be \".\", \"..\" or contain '/'"
        ))
    } else if name.chars().any(char::is_control) {
        Err(format!("name {name:?} contains control characters"))
    } else {
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The dotted key path of the most specific key, value or array element covering `span`.
fn key_at(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
    let mut walk = Walk::new(span.start);
    walk.table(table, "", 0);
    walk.best.map(|b| b.path)
}

/// The dotted key path of a key the parser found twice at `span`: the table of the key
/// written last before it, and the key as written.
fn duplicate_key(table: &DeTable<'_>, text: &str, span: &Range<usize>) -> Option<String> {
    let mut walk = Walk::new(span.start);
    walk.table(table, "", 0);
    let written = text.get(span.clone())?.trim();
    let written = written.trim_matches(|c| c == '"' || c == '\'');
    let prefix = walk.before.map(|(_, prefix)| prefix).unwrap_or_default();
    Some(join_key(&prefix, written))
}

/// Collects, for one offset, the most specific node covering it and the table of the last
/// key before it.
struct Walk {
    offset: usize,
    best: Option<Best>,
    before: Option<(usize, String)>,
}

struct Best {
    len: usize,
    depth: usize,
    path: String,
}

impl Walk {
    fn new(offset: usize) -> Self {
        Walk {
            offset,
            best: None,
            before: None,
        }
    }

    fn consider(&mut self, span: Range<usize>, path: &str, depth: usize) {
        let offset = self.offset;
        let covers = span.start <= offset
            && (offset < span.end || (span.is_empty() && offset == span.start));
        if !covers {
            return;
        }
        let len = span.len();
        let better = self
            .best
            .as_ref()
            .is_none_or(|b| len < b.len || (len == b.len && depth > b.depth));
        if better {
            self.best = Some(Best {
                len,
                depth,
                path: path.to_owned(),
            });
        }
    }

    fn table(&mut self, table: &DeTable<'_>, prefix: &str, depth: usize) {
        for (key, value) in table {
            let path = join_key(prefix, key.get_ref());
            let start = key.span().start;
            if key.span().end <= self.offset && self.before.as_ref().is_none_or(|b| b.0 < start) {
                self.before = Some((start, prefix.to_owned()));
            }
            self.consider(key.span(), &path, depth);
            self.consider(value.span(), &path, depth);
            self.value(value.get_ref(), &path, depth + 1);
        }
    }

    fn value(&mut self, value: &DeValue<'_>, path: &str, depth: usize) {
        match value {
            DeValue::Table(table) => self.table(table, path, depth),
            DeValue::Array(array) => {
                for (i, element) in array.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    self.consider(element.span(), &path, depth);
                    self.value(element.get_ref(), &path, depth + 1);
                }
            }
            _ => {}
        }
    }
}

fn join_key(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// Rewrites a deserializer message in the file's terms; returns the key and the message.
fn explain(key: String, message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // "unknown field `x`, expected one of `a`, `b`" or "..., there are no fields"
        let known: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let unknown = rest.split('`').next().unwrap_or_default();
        let text = match closest(unknown, &known) {
            Some(close) => format!("unknown key `{unknown}`; did you mean `{close}`?"),
            None if known.is_empty() => format!("unknown key `{unknown}`"),
            None => format!("unknown key `{unknown}`; known keys: {}", known.join(", ")),
        };
        return (key, text);
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        let key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
        return (key, "required key is missing".to_owned());
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((got, expected)) = rest.split_once(", expected ")
    {
        let expected = match expected {
            "i64" | "u64" | "i32" | "u32" | "usize" => "a non-negative integer",
            "a boolean" => "true or false",
            "a sequence" => "an array",
            s if s.starts_with("struct ") => "a table",
            s => s,
        };
        let got = match got {
            "map" => "table",
            "sequence" => "array",
            got => got,
        };
        return (key, format!("expected {expected}, got {got}"));
    }
    (key, message.to_owned())
}

/// The known key closest to `unknown`, if it is close enough to be a typo.
fn closest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .filter(|(d, k)| {
            *d <= 2.max(k.len() / 3)
                || (unknown.len() >= 3 && (k.starts_with(unknown) || unknown.starts_with(k)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A scratch directory with sources to point configs at; `@D` in a config stands for it.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().canonicalize().expect("canonical tempdir");
            for sub in ["src/inner", "src2", "a/data", "b/data", "replica"] {
                std::fs::create_dir_all(root.join(sub)).expect("mkdir");
            }
            std::fs::write(root.join("file"), b"x").expect("write");
            std::os::unix::fs::symlink(root.join("src"), root.join("link")).expect("symlink");
            Fixture { _dir: dir, root }
        }

        fn expand(&self, text: &str) -> String {
            text.replace("@D", &self.root.to_string_lossy())
        }

        fn parse(&self, text: &str) -> Result<Config, ConfigError> {
            parse(Path::new("w.toml"), &self.expand(text))
        }

        fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let path = self.root.join(name);
            std::fs::write(&path, self.expand(text)).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            path
        }
    }

    /// (config, line, key, message fragment); an empty key expects a syntax error with a
    /// column.
    const BROKEN: &[(&str, usize, &str, &str)] = &[
        (
            "[deamon]\nbackend = \"auto\"\n",
            1,
            "deamon",
            "unknown key `deamon`; did you mean `daemon`?",
        ),
        (
            "[daemon]\nbackendd = \"auto\"\n",
            2,
            "daemon.backendd",
            "did you mean `backend`?",
        ),
        (
            "[daemon]\nbackend = \"bpf\"\n",
            2,
            "daemon.backend",
            "unknown backend \"bpf\", expected \"auto\", \"fanotify\", \"inotify\" or \"ebpf\"",
        ),
        (
            "[daemon]\nebpf_probes = \"fentry\"\n",
            2,
            "daemon.ebpf_probes",
            "unknown probe set \"fentry\", expected \"auto\", \"vfs\" or \"syscalls\"",
        ),
        (
            "[daemon]\nebpf_ringbuf_bytes = 4096\n",
            2,
            "daemon.ebpf_ringbuf_bytes",
            "must be at least 16384, got 4096",
        ),
        (
            "[daemon]\nebpf_ringbuf_bytes = 4294967296\n",
            2,
            "daemon.ebpf_ringbuf_bytes",
            "must be at most 1073741824 (1 GiB), got 4294967296",
        ),
        (
            "[daemon]\nebpf_kernel_filter = \"yes\"\n",
            2,
            "daemon.ebpf_kernel_filter",
            "expected true or false, got string \"yes\"",
        ),
        (
            "[daemon]\nstate_dir = \"var/lib/watcher\"\n",
            2,
            "daemon.state_dir",
            "\"var/lib/watcher\" is not an absolute path",
        ),
        (
            "[daemon]\nmetrics = \"0.0.0.0:9469\"\n",
            2,
            "daemon.metrics",
            "0.0.0.0:9469 is not a loopback address",
        ),
        (
            "[daemon]\n\nmetrics = \"localhost:9469\"\n",
            3,
            "daemon.metrics",
            "\"localhost:9469\" is not an address and port",
        ),
        (
            "[daemon]\nrsync = \"bin/rsync\"\n",
            2,
            "daemon.rsync",
            "must be a program name looked up in PATH or an absolute path",
        ),
        ("", 1, "sync", "no [[sync]] groups"),
        (
            "[[sync]]\nsource = \"@D/src\"\nexcludes = [\"*.swp\"]\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].excludes",
            "unknown key `excludes`; did you mean `exclude`?",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\ncolour = \"red\"\n",
            3,
            "sync[0].colour",
            "unknown key `colour`; known keys: name, source, exclude",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.targets]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].targets",
            "did you mean `target`?",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\npasword_file = \"/p\"\n",
            5,
            "sync[0].target[0].pasword_file",
            "did you mean `password_file`?",
        ),
        (
            "[sync]\nsource = \"@D/src\"\n",
            1,
            "sync",
            "expected an array, got table",
        ),
        (
            "[[sync]]\nname = \"x\"\n[[sync.target]]\ndest = \"@D/replica\"\n",
            1,
            "sync[0].source",
            "required key is missing",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\nname = \"r\"\n",
            3,
            "sync[0].target[0].dest",
            "required key is missing",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\ndelay_ms = -5\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].delay_ms",
            "expected a non-negative integer, got -5",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n\ndelay_ms = \"fast\"\n",
            4,
            "sync[0].delay_ms",
            "expected a non-negative integer, got string \"fast\"",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nmax_batch = 1.5\n",
            3,
            "sync[0].max_batch",
            "expected a non-negative integer, got floating point `1.5`",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nhard_links = \"yes\"\n",
            3,
            "sync[0].hard_links",
            "expected true or false, got string \"yes\"",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nmax_delay_ms = 50\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].max_delay_ms",
            "max_delay_ms (50) is less than delay_ms (100)",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\ndelay_ms = 5000\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].delay_ms",
            "delay_ms (5000) exceeds max_delay_ms (1000, the default)",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nmax_batch = 0\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].max_batch",
            "must be at least 1, got 0",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nverify_interval = \"6 parsecs\"\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].verify_interval",
            "invalid duration \"6 parsecs\"",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nverify_interval = \"0s\"\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].verify_interval",
            "must be longer than zero",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nexclude = [\"*.swp\", \"\"]\n[[sync.target]]\ndest = \"@D/replica\"\n",
            3,
            "sync[0].exclude[1]",
            "empty exclude pattern",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nrsync_args = [\n  \"--numeric-ids\",\n  \"/etc\",\n]\n[[sync.target]]\ndest = \"@D/replica\"\n",
            5,
            "sync[0].rsync_args[1]",
            "\"/etc\" is not an rsync option",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nssh = [\"ssh\"]\n",
            5,
            "sync[0].target[0].ssh",
            "only for ssh targets",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h:/r\"\nssh = []\n",
            5,
            "sync[0].target[0].ssh",
            "program first",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nrsync_args = [\"--password-file=/p\"]\n",
            5,
            "sync[0].target[0].rsync_args[0]",
            "password_file key",
        ),
        (
            "[[sync]]\nsource = \"src\"\n",
            2,
            "sync[0].source",
            "source \"src\" is not an absolute path",
        ),
        (
            "[[sync]]\nsource = \"@D/nope\"\n",
            2,
            "sync[0].source",
            "source @D/nope does not exist",
        ),
        (
            "[[sync]]\nsource = \"@D/file\"\n",
            2,
            "sync[0].source",
            "source @D/file is not a directory",
        ),
        (
            "[[sync]]\nname = \"a/b\"\nsource = \"@D/src\"\n",
            2,
            "sync[0].name",
            "may not be \".\", \"..\" or contain '/'",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n",
            1,
            "sync[0].target",
            "no targets",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"\"\n",
            4,
            "sync[0].target[0].dest",
            "dest is empty",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"--delete\"\n",
            4,
            "sync[0].target[0].dest",
            "would be read as an rsync option",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"replica\"\n",
            4,
            "sync[0].target[0].dest",
            "local dest \"replica\" is not an absolute path",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/file\"\n",
            4,
            "sync[0].target[0].dest",
            "exists and is not a directory",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/src/new/replica\"\n",
            4,
            "sync[0].target[0].dest",
            "target @D/src/new/replica lies inside source @D/src",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/link/replica\"\n",
            4,
            "sync[0].target[0].dest",
            "target @D/src/replica lies inside source @D/src",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/src2/../replica/..\"\n",
            4,
            "sync[0].target[0].dest",
            "source @D/src lies inside target @D:",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/replica\"\npassword_file = \"/p\"\n",
            5,
            "sync[0].target[0].password_file",
            "password_file is only for rsync daemon targets (host::module or rsync://...), and @D/replica is a local directory",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"host:/srv/x\"\npassword_file = \"/p\"\n",
            5,
            "sync[0].target[0].password_file",
            "host:/srv/x goes over ssh",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"rsync://h/m\"\npassword_file = \"p\"\n",
            5,
            "sync[0].target[0].password_file",
            "\"p\" is not an absolute path",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\nmax_backlog = 0\n",
            5,
            "sync[0].target[0].max_backlog",
            "must be at least 1, got 0",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync.target]]\ndest = \"h::m\"\n",
            6,
            "sync[0].target[1].dest",
            "target name \"h::m\" is already used by sync[0].target[0]; a target's name defaults to its dest",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\nname = \"t\"\ndest = \"h::m\"\n[[sync.target]]\nname = \"t\"\ndest = \"h::n\"\n",
            7,
            "sync[0].target[1].name",
            "target name \"t\" is already used by sync[0].target[0]",
        ),
        (
            "[[sync]]\nname = \"x\"\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n\n[[sync]]\nname = \"x\"\nsource = \"@D/src2\"\n[[sync.target]]\ndest = \"h::n\"\n",
            8,
            "sync[1].name",
            "group name \"x\" is already used by sync[0] (line 1)",
        ),
        (
            "[[sync]]\nsource = \"@D/a/data\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/b/data\"\n[[sync.target]]\ndest = \"h::n\"\n",
            6,
            "sync[1].source",
            "group name \"data\", taken from the source's last component, is already used by sync[0] (line 1); set a distinct `name`",
        ),
        (
            "[[sync]]\nname = \"a\"\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nname = \"b\"\nsource = \"@D/link\"\n[[sync.target]]\ndest = \"h::n\"\n",
            8,
            "sync[1].source",
            "@D/src is also the source of sync[0]",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/src/inner\"\n[[sync.target]]\ndest = \"h::n\"\n",
            6,
            "sync[1].source",
            "@D/src/inner lies inside the source of sync[0] (@D/src)",
        ),
        (
            "[[sync]]\nsource = \"@D/src/inner\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::n\"\n",
            6,
            "sync[1].source",
            "@D/src contains the source of sync[0] (@D/src/inner)",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n[[sync]]\nsource = \"@D/src2\"\n[[sync.target]]\ndest = \"@D/src/copy\"\n",
            8,
            "sync[1].target[0].dest",
            "target @D/src/copy lies inside source @D/src: the daemon would copy its own copies (sync[0])",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"@D/replica\"\n[[sync]]\nsource = \"@D/src2\"\n[[sync.target]]\ndest = \"@D/replica/two\"\n",
            8,
            "sync[1].target[0].dest",
            "overlaps sync[0].target[0].dest (@D/replica)",
        ),
        (
            "[[sync]]\nname = \"x\nsource = \"@D/src\"\n",
            2,
            "",
            "w.toml:2:10: ",
        ),
        (
            "[[sync]]\nsource = \"@D/src\"\nsource = \"@D/src2\"\n",
            3,
            "",
            "w.toml:3:1: sync[0].source: duplicate key",
        ),
        (
            "[daemon]\nrsync = \"rsync\"\n\n[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n  dest = \"h::n\"\n",
            8,
            "",
            "w.toml:8:3: sync[0].target[0].dest: duplicate key",
        ),
    ];

    #[test]
    fn broken_configs_name_line_and_key() {
        let fx = Fixture::new();
        assert!(BROKEN.len() >= 15);
        for (text, line, key, fragment) in BROKEN {
            let err = match fx.parse(text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e,
            };
            let message = err.to_string();
            let fragment = fx.expand(fragment);
            let place = if key.is_empty() {
                format!("w.toml:{line}:")
            } else {
                format!("w.toml:{line}: {key}: ")
            };
            assert!(
                message.starts_with(&place),
                "{message:?} should start with {place:?}\n{text}"
            );
            assert!(
                message.contains(&fragment),
                "{message:?} should contain {fragment:?}\n{text}"
            );
            match err {
                ConfigError::Invalid {
                    line: l,
                    column,
                    key: k,
                    ..
                } => {
                    assert_eq!(l, *line, "{message}");
                    assert_eq!(column.is_some(), key.is_empty(), "{message}");
                    if !key.is_empty() {
                        assert_eq!(k, *key, "{message}");
                    }
                }
                other => panic!("not an Invalid error: {other:?}"),
            }
        }
    }

    const FULL: &str = r#"# every key
[daemon]
backend = "fanotify"
state_dir = "/var/lib/watcher-test"
status_socket = "/run/watcher-test/status.sock"
metrics = "[::1]:9469"
rsync = "/usr/local/bin/rsync"
ebpf_probes = "syscalls"
ebpf_ringbuf_bytes = 65536
ebpf_kernel_filter = false

[[sync]]
name = "data"
source = "@D/src/"
exclude = ["*.swp", ".cache/"]
rsync_args = ["--numeric-ids"]
hard_links = true
delay_ms = 50
max_delay_ms = 2000
max_batch = 500
initial_sync = false
verify_interval = "6h 30m"

[[sync.target]]
dest = "backup1::data"
password_file = "@D/backup1.pass"
rsync_args = ["--timeout=60"]
max_backlog = 1000

[[sync.target]]
name = "replica"
dest = "@D/replica/data"

[[sync]]
source = "@D/src2"

[[sync.target]]
dest = "user@host:/srv/src2"
ssh = ["ssh", "-p", "2222", "-i", "/etc/watcher/id_ed25519"]
"#;

    #[test]
    fn full_config() {
        let fx = Fixture::new();
        let config = fx.parse(FULL).expect("valid");
        assert_eq!(config.path, Path::new("w.toml"));
        assert_eq!(
            config.daemon,
            DaemonConfig {
                backend: BackendKind::Fanotify,
                state_dir: "/var/lib/watcher-test".into(),
                status_socket: "/run/watcher-test/status.sock".into(),
                metrics: Some("[::1]:9469".parse().expect("addr")),
                rsync: "/usr/local/bin/rsync".into(),
                ebpf_probes: crate::backend::ebpf::ProbeChoice::Syscalls,
                ebpf_ringbuf_bytes: 65536,
                ebpf_kernel_filter: false,
            }
        );
        assert_eq!(config.groups.len(), 2);
        let data = &config.groups[0];
        assert_eq!(data.name, "data");
        assert_eq!(data.source, fx.root.join("src"));
        assert_eq!(data.excludes, ["*.swp", ".cache/"]);
        assert_eq!(data.rsync_args, [OsString::from("--numeric-ids")]);
        assert!(data.hard_links);
        assert_eq!(data.flush.delay, Duration::from_millis(50));
        assert_eq!(data.flush.max_delay, Duration::from_secs(2));
        assert_eq!(data.flush.max_batch, 500);
        assert!(!data.initial_sync);
        assert_eq!(
            data.verify_interval,
            Some(Duration::from_secs(6 * 3600 + 1800))
        );
        let password = fx.root.join("backup1.pass");
        assert_eq!(
            data.targets,
            [
                TargetConfig {
                    name: "backup1::data".into(),
                    dest: "backup1::data".into(),
                    password_file: Some(password.clone()),
                    rsync_args: vec!["--timeout=60".into()],
                    ssh: vec![],
                    max_backlog: 1000,
                },
                TargetConfig {
                    name: "replica".into(),
                    dest: fx.root.join("replica/data").into_os_string(),
                    password_file: None,
                    rsync_args: vec![],
                    ssh: vec![],
                    max_backlog: 1_000_000,
                },
            ]
        );
        let mut password_arg = OsString::from("--password-file=");
        password_arg.push(&password);
        assert_eq!(
            data.targets[0].rsync_args(data),
            [
                OsString::from("--numeric-ids"),
                password_arg,
                OsString::from("--timeout=60")
            ]
        );
        assert_eq!(
            data.targets[1].rsync_args(data),
            [OsString::from("--numeric-ids")]
        );
        let second = &config.groups[1];
        assert_eq!(second.name, "src2");
        assert_eq!(second.targets[0].name, "user@host:/srv/src2");
        assert_eq!(
            second.targets[0].ssh,
            ["ssh", "-p", "2222", "-i", "/etc/watcher/id_ed25519"].map(OsString::from)
        );
    }

    #[test]
    fn defaults() {
        let fx = Fixture::new();
        let config = fx
            .parse("[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\n")
            .expect("valid");
        assert_eq!(config.daemon, DaemonConfig::default());
        assert_eq!(config.daemon.backend, BackendKind::Auto);
        assert_eq!(config.daemon.state_dir, Path::new("/var/lib/watcher"));
        assert_eq!(
            config.daemon.status_socket,
            Path::new("/run/watcher/status.sock")
        );
        assert_eq!(config.daemon.metrics, None);
        assert_eq!(config.daemon.rsync, Path::new("rsync"));
        let group = &config.groups[0];
        assert_eq!(group.name, "src");
        assert!(group.excludes.is_empty());
        assert!(group.rsync_args.is_empty());
        assert!(!group.hard_links);
        let flush = FlushConfig::default();
        assert_eq!(group.flush.delay, flush.delay);
        assert_eq!(group.flush.max_delay, flush.max_delay);
        assert_eq!(group.flush.max_batch, flush.max_batch);
        assert!(group.initial_sync);
        assert_eq!(group.verify_interval, None);
        let target = &group.targets[0];
        assert_eq!(target.name, "h::m");
        assert_eq!(target.password_file, None);
        assert_eq!(target.max_backlog, 1_000_000);
        assert!(target.rsync_args(group).is_empty());
    }

    #[test]
    fn dest_kinds() {
        for (dest, kind) in [
            ("/mnt/replica", DestKind::Local),
            ("/mnt/a:b", DestKind::Local),
            ("host::module", DestKind::Daemon),
            ("user@host::module/sub", DestKind::Daemon),
            ("rsync://user@127.0.0.1:8730/mod/", DestKind::Daemon),
            ("host:/srv/replica", DestKind::Ssh),
            ("user@host:relative", DestKind::Ssh),
        ] {
            assert_eq!(dest_kind(dest), kind, "{dest}");
        }
    }

    #[test]
    fn suggestions() {
        let known = [
            "name",
            "source",
            "exclude",
            "rsync_args",
            "delay_ms",
            "target",
        ];
        assert_eq!(closest("sourc", &known), Some("source"));
        assert_eq!(closest("delay", &known), Some("delay_ms"));
        assert_eq!(closest("rsync_arg", &known), Some("rsync_args"));
        assert_eq!(closest("colour", &known), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn positions_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(position(text, 0), (1, 1));
        assert_eq!(position(text, 6), (2, 1));
        // The byte after "bé = " is the 6th character of line 2.
        assert_eq!(position(text, text.find('"').expect("quote")), (2, 6));
    }

    const WITH_PASSWORD: &str = "[[sync]]\nsource = \"@D/src\"\n[[sync.target]]\ndest = \"h::m\"\npassword_file = \"@D/pass\"\n";

    #[test]
    fn load_refuses_a_config_others_can_write() {
        let fx = Fixture::new();
        fx.write("pass", "secret\n", 0o600);
        for mode in [0o664, 0o646, 0o622] {
            let path = fx.write("w.toml", WITH_PASSWORD, mode);
            let err = load(&path).expect_err("writable config accepted");
            let message = err.to_string();
            assert!(
                matches!(err, ConfigError::Permissions { mode: m, .. } if m == mode),
                "{message}"
            );
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
        }
        for mode in [0o600, 0o644, 0o400] {
            let path = fx.write("w.toml", WITH_PASSWORD, mode);
            let config = load(&path).expect("config");
            assert_eq!(config.path, path);
        }
    }

    #[test]
    fn load_checks_password_files() {
        let fx = Fixture::new();
        let config = fx.write("w.toml", WITH_PASSWORD, 0o644);
        let pass = fx.root.join("pass");

        let err = load(&config).expect_err("missing password file accepted");
        assert!(
            err.to_string().starts_with(&format!(
                "{}:5: sync[0].target[0].password_file: password file {} does not exist",
                config.display(),
                pass.display()
            )),
            "{err}"
        );

        for mode in [0o640, 0o604, 0o644, 0o660] {
            fx.write("pass", "secret\n", mode);
            let message = load(&config)
                .expect_err("accessible password file accepted")
                .to_string();
            assert!(
                message.starts_with(&format!(
                    "{}:5: sync[0].target[0].password_file: password file {} is accessible by group or others (mode {mode:04o})",
                    config.display(),
                    pass.display()
                )),
                "{message}"
            );
            assert!(
                message.contains(&format!("chmod 600 {}", pass.display())),
                "{message}"
            );
        }

        fx.write("pass", "secret\n", 0o600);
        let loaded = load(&config).expect("config");
        let group = &loaded.groups[0];
        let mut arg = OsString::from("--password-file=");
        arg.push(&pass);
        assert_eq!(group.targets[0].rsync_args(group), [arg]);
        // parse alone does not look at password files.
        std::fs::remove_file(&pass).expect("rm");
        assert!(parse(&config, &fx.expand(WITH_PASSWORD)).is_ok());
    }

    #[test]
    fn load_as_root_wants_a_password_file_owned_by_root() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let fx = Fixture::new();
        let config = fx.write("w.toml", WITH_PASSWORD, 0o644);
        let pass = fx.write("pass", "secret\n", 0o600);
        nix::unistd::chown(&pass, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let message = load(&config)
            .expect_err("foreign password file")
            .to_string();
        assert!(message.contains("owned by uid 65534"), "{message}");
        assert!(message.contains("chown root"), "{message}");
    }

    #[test]
    fn load_of_a_missing_file_names_it() {
        let fx = Fixture::new();
        let path = fx.root.join("absent.toml");
        let err = load(&path).expect_err("missing file");
        assert!(matches!(err, ConfigError::NotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("config file {} does not exist", path.display())
        );
    }

    #[test]
    fn load_reports_errors_against_the_file() {
        let fx = Fixture::new();
        let path = fx.write(
            "w.toml",
            "[[sync]]\nsource = \"@D/src\"\ndelay_ms = -1\n",
            0o644,
        );
        let message = load(&path).expect_err("bad value").to_string();
        assert_eq!(
            message,
            format!(
                "{}:3: sync[0].delay_ms: expected a non-negative integer, got -1",
                path.display()
            )
        );
    }
}
