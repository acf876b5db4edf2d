//! The rules: from the configuration as written ([`super::schema`]) to the checked values
//! of [`super::Config`], each failure placed at its key by [`Ctx::error`].
//!
//! The same rules check a file and `watcher sync`'s command line; only the way an error
//! names its place differs ([`Origin`]), so a value the file refuses is refused on the
//! command line too, for the same reason.
//!
//! Every key is checked and every error kept ([`Found`]), so that one `config check` shows
//! all that is wrong instead of one error per round of edit and retry; a check that needs
//! another key's value waits for that key to be good, so no error is a guess.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::errors::{ConfigError, position};
use super::schema::{OsText, RawDaemon, RawDelete, RawFile, RawGroup, RawTarget, defaults};
use super::{Config, DaemonConfig, GroupConfig, TargetConfig};
use crate::backend::BackendKind;
use crate::filter::{ExcludeError, Excludes};
use crate::flush::FlushConfig;
use crate::target::{Target, TargetError, TargetKind};

pub(super) type PasswordFiles = Vec<(Range<usize>, String, PathBuf)>;

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

/// Where the values being checked come from, which decides how an error names its place.
#[derive(Clone, Copy)]
pub(super) enum Origin<'a> {
    /// A file: errors give its path, the line of the key and the dotted key.
    File {
        /// The file, as named in errors.
        path: &'a Path,
        /// Its text, for line numbers.
        text: &'a str,
    },
    /// `watcher sync`'s command line: errors name the option that set the key
    /// (`sync[0].max_batch` -> `--max-batch`).
    Options(&'a dyn Fn(&str) -> String),
}

/// The errors found in one table (the daemon's, a group's own keys, a target's). Each key
/// is checked on its own and every error is kept, so one `config check` names every bad
/// key; a check that needs another key's value is skipped when that key is bad, as its
/// own error already says what to fix first.
#[derive(Default)]
struct Found(Vec<ConfigError>);

impl Found {
    /// Keeps `error`; each of several, so they are put in order one by one.
    fn push(&mut self, error: ConfigError) {
        match error {
            ConfigError::Several(errors) => self.0.extend(errors),
            error => self.0.push(error),
        }
    }

    /// The value of `result`, or None with its error kept.
    fn keep<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    /// Ok when nothing was found, else every error in file order: by line, and in the
    /// order of the checks on one line or on the command line (which has no lines).
    fn into_result(mut self) -> Result<(), ConfigError> {
        self.0.sort_by_key(|e| match e {
            ConfigError::Invalid { line, .. } => *line,
            _ => 0,
        });
        ConfigError::all(self.0).map_or(Ok(()), Err)
    }
}

pub(super) struct Ctx<'a> {
    pub(super) origin: Origin<'a>,
}

impl Ctx<'_> {
    pub(super) fn error(
        &self,
        span: &Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let key = key.into();
        let message = message.into();
        match self.origin {
            Origin::File { path, .. } => ConfigError::Invalid {
                path: path.to_path_buf(),
                line: self.line(span),
                column: None,
                key,
                message,
            },
            Origin::Options(option) => ConfigError::CommandLine {
                option: option(&key),
                message,
            },
        }
    }

    /// The 1-based line of `span` in the file (0 on the command line).
    fn line(&self, span: &Range<usize>) -> usize {
        match self.origin {
            Origin::File { text, .. } => position(text, span.start).0,
            Origin::Options(_) => 0,
        }
    }

    /// How a message that mentions the key `key` calls it: the key's own name in a file
    /// (`max_delay_ms`), the option on the command line (`--max-delay`).
    fn name(&self, key: &str) -> String {
        match self.origin {
            Origin::File { .. } => key.rsplit('.').next().unwrap_or(key).to_owned(),
            Origin::Options(option) => option(key),
        }
    }

    /// Checks `raw`; also returns the password files named, for [`super::load`] to check.
    pub(super) fn config(&self, raw: &RawFile) -> Result<(Config, PasswordFiles), ConfigError> {
        // The daemon table and each group are checked apart, and every error is reported,
        // within one table too (see `Found`).
        let mut errors = Vec::new();
        let daemon = self.daemon(raw.daemon.as_ref());
        if raw.sync.is_empty() {
            errors.push(self.error(
                &(0..0),
                "sync",
                "no [[sync]] groups: add one with a source and at least one [[sync.target]]",
            ));
        }
        let mut groups = Vec::with_capacity(raw.sync.len());
        let mut spans = Vec::with_capacity(raw.sync.len());
        let mut password_files = Vec::new();
        for (i, group) in raw.sync.iter().enumerate() {
            match self.group(i, group, &mut password_files) {
                Ok((config, group_spans)) => {
                    groups.push(config);
                    spans.push(group_spans);
                }
                Err(e) => errors.push(e),
            }
        }
        let daemon = match daemon {
            Ok(daemon) => daemon,
            Err(e) => {
                errors.insert(0, e);
                DaemonConfig::default()
            }
        };
        if let Some(e) = ConfigError::all(errors) {
            return Err(e);
        }
        self.across_groups(&groups, &spans)?;
        let path = match self.origin {
            Origin::File { path, .. } => path.to_path_buf(),
            Origin::Options(_) => PathBuf::from("(command line)"),
        };
        let config = Config {
            path,
            daemon,
            groups,
        };
        Ok((config, password_files))
    }

    fn daemon(&self, raw: Option<&RawDaemon>) -> Result<DaemonConfig, ConfigError> {
        let mut config = DaemonConfig::default();
        let Some(raw) = raw else {
            return Ok(config);
        };
        let mut found = Found::default();
        if let Some(backend) = &raw.backend {
            match backend.get_ref().as_str() {
                "auto" => config.backend = BackendKind::Auto,
                "fanotify" => config.backend = BackendKind::Fanotify,
                "inotify" => config.backend = BackendKind::Inotify,
                "ebpf" => config.backend = BackendKind::Ebpf,
                other => found.push(self.error(
                    &backend.span(),
                    "daemon.backend",
                    format!("unknown backend {other:?}, expected \"auto\", \"fanotify\", \"inotify\" or \"ebpf\""),
                )),
            }
        }
        if let Some(probes) = &raw.ebpf_probes {
            use crate::backend::ebpf::ProbeChoice;
            match probes.get_ref().as_str() {
                "auto" => config.ebpf_probes = ProbeChoice::Auto,
                "vfs" => config.ebpf_probes = ProbeChoice::Vfs,
                "syscalls" => config.ebpf_probes = ProbeChoice::Syscalls,
                other => found.push(self.error(
                    &probes.span(),
                    "daemon.ebpf_probes",
                    format!(
                        "unknown probe set {other:?}, expected \"auto\", \"vfs\" or \"syscalls\""
                    ),
                )),
            }
        }
        if let Some(bytes) = &raw.ebpf_ringbuf_bytes {
            const MAX: u64 = 1 << 30;
            let n = self.count(Some(bytes), "daemon.ebpf_ringbuf_bytes", 0, 16 << 10);
            match found.keep(n) {
                Some(n) if n > MAX => found.push(self.error(
                    &bytes.span(),
                    "daemon.ebpf_ringbuf_bytes",
                    format!("must be at most {MAX} (1 GiB), got {n}"),
                )),
                Some(n) => config.ebpf_ringbuf_bytes = n as u32,
                None => {}
            }
        }
        if let Some(on) = raw.ebpf_kernel_filter {
            config.ebpf_kernel_filter = on;
        }
        if let Some(n) = &raw.max_processes
            && let Some(n) = found.keep(self.count(Some(n), "daemon.max_processes", 1, 1))
        {
            config.max_processes = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(dir) = &raw.state_dir
            && let Some(dir) = found.keep(self.absolute(dir, "daemon.state_dir"))
        {
            config.state_dir = dir;
        }
        if let Some(socket) = &raw.status_socket
            && let Some(socket) = found.keep(self.absolute(socket, "daemon.status_socket"))
        {
            config.status_socket = socket;
        }
        if let Some(metrics) = &raw.metrics {
            config.metrics_allow_remote = raw.metrics_allow_remote.unwrap_or(false);
            match metrics.get_ref().parse::<SocketAddr>() {
                Err(_) => found.push(self.error(
                    &metrics.span(),
                    "daemon.metrics",
                    format!(
                        "{:?} is not an address and port such as \"127.0.0.1:9469\" or \"[::1]:9469\"",
                        metrics.get_ref()
                    ),
                )),
                Ok(addr) if !addr.ip().is_loopback() && !config.metrics_allow_remote => {
                    found.push(self.error(
                        &metrics.span(),
                        "daemon.metrics",
                        format!(
                            "{addr} is not a loopback address; the metrics endpoint has no authentication, so bind it to 127.0.0.1 or [::1], or set metrics_allow_remote = true to serve it to other hosts"
                        ),
                    ));
                }
                Ok(addr) => config.metrics = Some(addr),
            }
        }
        if let Some(rsync) = &raw.rsync {
            let path = rsync.get_ref();
            let bare = !path.as_os_str().is_empty()
                && path.components().count() == 1
                && path.is_relative();
            if !bare && !path.is_absolute() {
                found.push(self.error(
                    &rsync.span(),
                    "daemon.rsync",
                    format!(
                        "{:?} must be a program name looked up in PATH or an absolute path",
                        rsync.get_ref()
                    ),
                ));
            } else {
                config.rsync = path.to_path_buf();
            }
        }
        found.into_result().map(|()| config)
    }

    fn absolute(&self, value: &Spanned<PathBuf>, key: &str) -> Result<PathBuf, ConfigError> {
        let path = value.get_ref();
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

    /// A command as an argument vector, program first (empty when not given).
    fn command(
        &self,
        value: Option<&Spanned<Vec<String>>>,
        key: &str,
        expected: &str,
    ) -> Result<Vec<OsString>, ConfigError> {
        match value {
            None => Ok(Vec::new()),
            Some(cmd) if cmd.get_ref().first().is_none_or(String::is_empty) => {
                Err(self.error(&cmd.span(), key, expected))
            }
            Some(cmd) => Ok(cmd.get_ref().iter().map(OsString::from).collect()),
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

    /// Every argument is checked: each bad one is reported.
    fn rsync_args(
        &self,
        args: &[Spanned<OsText>],
        key: &str,
    ) -> Result<Vec<OsString>, ConfigError> {
        let mut found = Found::default();
        for (i, arg) in args.iter().enumerate() {
            let text = &arg.get_ref().0;
            let bytes = text.as_bytes();
            let key = format!("{key}[{i}]");
            if !bytes.starts_with(b"-") || bytes == b"-" || bytes == b"--" {
                found.push(self.error(
                    &arg.span(),
                    key,
                    format!(
                        "{text:?} is not an rsync option; rsync would take it as another source or destination (write options with a value as \"--option=value\")"
                    ),
                ));
            } else if bytes.starts_with(b"--password-file") {
                found.push(self.error(
                    &arg.span(),
                    key,
                    "set the password file with the target's password_file key, whose permissions are checked",
                ));
            }
        }
        found.into_result()?;
        Ok(args.iter().map(|arg| arg.get_ref().0.clone()).collect())
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
        let mut found = Found::default();

        let source = found.keep(self.source(&raw.source, &format!("{key}.source")));
        let name = match &raw.name {
            Some(name) => found.keep(
                check_name(name.get_ref())
                    .map(|()| name.get_ref().clone())
                    .map_err(|m| self.error(&name.span(), format!("{key}.name"), m)),
            ),
            // Named after the source only when the source is good: a bad one has its own
            // error, and a name taken from it would be a guess.
            None => source.as_deref().and_then(|source| {
                let name = raw
                    .source
                    .get_ref()
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
                    });
                found.keep(name)
            }),
        };
        let excludes = found.keep(self.excludes(&key, &header, raw));
        let rsync_args = found.keep(self.rsync_args(&raw.rsync_args, &format!("{key}.rsync_args")));

        let delay_key = format!("{key}.delay_ms");
        let max_delay_key = format!("{key}.max_delay_ms");
        let delay =
            found.keep(self.count(raw.delay_ms.as_ref(), &delay_key, defaults::DELAY_MS, 0));
        let max_delay = found.keep(self.count(
            raw.max_delay_ms.as_ref(),
            &max_delay_key,
            defaults::MAX_DELAY_MS,
            0,
        ));
        let max_batch = found.keep(self.count(
            raw.max_batch.as_ref(),
            &format!("{key}.max_batch"),
            defaults::MAX_BATCH as u64,
            1,
        ));
        // Compared only when both are good numbers: a bad one has its own error.
        if let (Some(delay), Some(max_delay)) = (delay, max_delay)
            && max_delay < delay
        {
            let (delay_name, max_delay_name) = (self.name(&delay_key), self.name(&max_delay_key));
            found.push(match (&raw.max_delay_ms, &raw.delay_ms) {
                (Some(m), _) => self.error(
                    &m.span(),
                    max_delay_key,
                    format!("{max_delay_name} ({max_delay}) is less than {delay_name} ({delay})"),
                ),
                (None, Some(d)) => self.error(
                    &d.span(),
                    delay_key,
                    format!(
                        "{delay_name} ({delay}) exceeds {max_delay_name} ({max_delay}, the default); raise {max_delay_name} too"
                    ),
                ),
                (None, None) => self.error(&header, &key, "max_delay_ms is less than delay_ms"),
            });
        }
        let delete = found.keep(self.delete(raw.delete.as_ref(), &format!("{key}.delete")));
        let verify_interval = found.keep(match &raw.verify_interval {
            None => Ok(None),
            Some(text) => self
                .interval(text, &format!("{key}.verify_interval"))
                .map(Some),
        });

        if raw.target.is_empty() {
            found.push(self.error(
                &header,
                format!("{key}.target"),
                "no targets: add at least one [[sync.target]] with a dest",
            ));
        }
        let mut targets = Vec::with_capacity(raw.target.len());
        let mut local_dests = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        // Each target table is checked on its own: every one with an error says so.
        for (j, target) in raw.target.iter().enumerate() {
            let tkey = format!("{key}.target[{j}]");
            let config = match self.target(
                &tkey,
                target.get_ref(),
                source.as_deref(),
                &mut local_dests,
                password_files,
            ) {
                Ok(config) => config,
                Err(e) => {
                    found.push(e);
                    continue;
                }
            };
            if let Some(first) = names.insert(config.name.clone(), j) {
                let (span, name_key, how) = match &target.get_ref().name {
                    Some(n) => (n.span(), format!("{tkey}.name"), "choose another name"),
                    None => (
                        target.get_ref().dest.span(),
                        format!("{tkey}.dest"),
                        "a target's name defaults to its dest; set a distinct `name`",
                    ),
                };
                found.push(self.error(
                    &span,
                    name_key,
                    format!(
                        "target name {:?} is already used by {key}.target[{first}]; {how}",
                        config.name
                    ),
                ));
                continue;
            }
            targets.push(config);
        }

        found.into_result()?;
        let (
            Some(source),
            Some(name),
            Some(excludes),
            Some(rsync_args),
            Some(delay),
            Some(max_delay),
            Some(max_batch),
            Some(delete),
            Some(verify_interval),
        ) = (
            source,
            name,
            excludes,
            rsync_args,
            delay,
            max_delay,
            max_batch,
            delete,
            verify_interval,
        )
        else {
            unreachable!("a key left without a value has an error");
        };
        let config = GroupConfig {
            name,
            source,
            targets,
            excludes,
            rsync_args,
            hard_links: raw.hard_links.unwrap_or(defaults::HARD_LINKS),
            one_file_system: raw.one_file_system.unwrap_or(defaults::ONE_FILE_SYSTEM),
            flush: FlushConfig {
                delay: Duration::from_millis(delay),
                max_delay: Duration::from_millis(max_delay),
                max_batch: usize::try_from(max_batch).unwrap_or(usize::MAX),
            },
            initial_sync: raw.initial_sync.unwrap_or(defaults::INITIAL_SYNC),
            delete,
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

    /// A group's `include`, `exclude` and `exclude_from` patterns, compiled as the event
    /// filter will, so that `config check` refuses what `run` would. Every bad pattern is
    /// reported.
    fn excludes(
        &self,
        key: &str,
        header: &Range<usize>,
        raw: &RawGroup,
    ) -> Result<Excludes, ConfigError> {
        let mut found = Found::default();
        // Includes go first, as `+ PAT` rules (which rsync's --exclude reads as includes):
        // rsync's first matching rule decides, and the event filter matches them first.
        // A pattern refused here still holds its place (as an include with nothing to
        // match, or the empty exclude it is), so the indices of the compiler's errors
        // stay those of the file.
        let mut patterns = Vec::with_capacity(raw.include.len() + raw.exclude.len());
        for (j, pattern) in raw.include.iter().enumerate() {
            let text = pattern.get_ref();
            let why = if text.is_empty() {
                Some("empty include pattern")
            } else if text.starts_with("+ ") || text.starts_with("- ") || text.starts_with('!') {
                Some("an include pattern is a plain pattern (no `+ `, `- ` or `!` prefix)")
            } else {
                None
            };
            if let Some(why) = why {
                found.push(self.error(&pattern.span(), format!("{key}.include[{j}]"), why));
                patterns.push(NO_INCLUDE.to_owned());
            } else {
                patterns.push(format!("+ {text}"));
            }
        }
        let includes = raw.include.len();
        for (j, pattern) in raw.exclude.iter().enumerate() {
            if pattern.get_ref().is_empty() {
                found.push(self.error(
                    &pattern.span(),
                    format!("{key}.exclude[{j}]"),
                    "empty exclude pattern",
                ));
            }
            patterns.push(pattern.get_ref().clone());
        }
        // Line numbers of the patterns read from `exclude_from`, which follow `exclude`'s.
        let mut file_lines = Vec::new();
        if let Some(file) = &raw.exclude_from {
            let fkey = format!("{key}.exclude_from");
            let path = file.get_ref();
            let fail = |message: String| self.error(&file.span(), fkey.clone(), message);
            let text = if path.is_absolute() {
                std::fs::read_to_string(path)
                    .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))
            } else {
                Err(fail(format!("{path:?} is not an absolute path")))
            };
            for (n, line) in found.keep(text).unwrap_or_default().lines().enumerate() {
                if line.is_empty() || line.starts_with(['#', ';']) {
                    continue;
                }
                patterns.push(line.to_owned());
                file_lines.push(n + 1);
            }
        }
        let located = |e: ExcludeError| {
            if let Some(j) = e.index
                && j < includes
            {
                return self.error(
                    &raw.include[j].span(),
                    format!("{key}.include[{j}]"),
                    e.to_string(),
                );
            }
            let e = ExcludeError {
                index: e.index.map(|j| j - includes),
                ..e
            };
            if let (Some(j), Some(file)) = (e.index, &raw.exclude_from)
                && let Some(line) = j
                    .checked_sub(raw.exclude.len())
                    .and_then(|i| file_lines.get(i))
            {
                return self.error(
                    &file.span(),
                    format!("{key}.exclude_from"),
                    format!("{} line {line}: {e}", file.get_ref().display()),
                );
            }
            let at = e.index.unwrap_or(0);
            let span = raw.exclude.get(at).map_or(header.clone(), |p| p.span());
            let key = match e.index {
                Some(j) => format!("{key}.exclude[{j}]"),
                None => format!("{key}.exclude"),
            };
            self.error(&span, key, e.to_string())
        };
        // The compiler stops at its first bad pattern; each one it names is replaced by a
        // good one of the same kind (so the rules after it are read as before) and the set
        // compiled again. An error of the set as a whole ends the search.
        let excludes = loop {
            let e = match Excludes::compile(&patterns) {
                Ok(excludes) => break Some(excludes),
                Err(e) => e,
            };
            let bad = e.index.and_then(|j| patterns.get_mut(j));
            found.push(located(e));
            let Some(bad) = bad else { break None };
            let stand_in = if bad.starts_with("+ ") {
                NO_INCLUDE
            } else {
                STAND_IN_EXCLUDE
            };
            if bad.as_str() == stand_in {
                break None;
            }
            stand_in.clone_into(bad);
        };
        found.into_result()?;
        let Some(excludes) = excludes else {
            unreachable!("a set that does not compile has an error");
        };
        Ok(excludes)
    }

    fn delete(
        &self,
        value: Option<&Spanned<RawDelete>>,
        key: &str,
    ) -> Result<crate::rsync::DeleteMode, ConfigError> {
        use crate::rsync::DeleteMode;
        let Some(value) = value else {
            return Ok(DeleteMode::Always);
        };
        match value.get_ref() {
            RawDelete::Bool(true) => Ok(DeleteMode::Always),
            RawDelete::Bool(false) => Ok(DeleteMode::Never),
            RawDelete::Word(w) if w == "startup" => Ok(DeleteMode::Startup),
            RawDelete::Word(w) if w == "running" => Ok(DeleteMode::Running),
            RawDelete::Word(w) => Err(self.error(
                &value.span(),
                key,
                format!("unknown value {w:?}, expected true, false, \"startup\" or \"running\""),
            )),
        }
    }

    /// A `verify_interval`: a duration longer than zero.
    fn interval(&self, text: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        let interval = humantime::parse_duration(text.get_ref()).map_err(|e| {
            self.error(
                &text.span(),
                key,
                format!(
                    "invalid duration {:?} ({e}); write it like \"6h\" or \"30m\"",
                    text.get_ref()
                ),
            )
        })?;
        if interval.is_zero() {
            return Err(self.error(
                &text.span(),
                key,
                "must be longer than zero; leave it out for no periodic verify",
            ));
        }
        Ok(interval)
    }

    fn source(&self, raw: &Spanned<PathBuf>, key: &str) -> Result<PathBuf, ConfigError> {
        let path = raw.get_ref();
        let text = path.display();
        let fail = |message: String| self.error(&raw.span(), key, message);
        if !path.is_absolute() {
            return Err(fail(format!("source {path:?} is not an absolute path")));
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
        source: Option<&Path>,
        local_dests: &mut Vec<LocalDest>,
        password_files: &mut PasswordFiles,
    ) -> Result<TargetConfig, ConfigError> {
        let mut found = Found::default();
        let spec = &raw.dest.get_ref().0;
        let dest = spec.to_string_lossy();
        let dest_key = format!("{key}.dest");
        let dest_error = |message: String| self.error(&raw.dest.span(), dest_key.clone(), message);
        let target = found.keep(Target::parse(spec).map_err(|e| {
            dest_error(match e {
                TargetError::Empty => "dest is empty".into(),
                TargetError::LooksLikeOption(_) => {
                    format!("dest {dest:?} starts with '-' and would be read as an rsync option")
                }
                TargetError::NotAbsolute(_) => format!(
                    "local dest {dest:?} is not an absolute path (remote targets look like host::module, rsync://host/module or host:/path)"
                ),
                TargetError::NotADirectory(_) => {
                    format!("dest {dest} exists and is not a directory")
                }
                other => other.to_string(),
            })
        }));
        // Whether the dest overlaps the source is asked only of a good source.
        if let (Some(target), Some(source)) = (&target, source) {
            found.keep(
                target
                    .check_overlap(source)
                    .map_err(|e| dest_error(e.to_string())),
            );
        }
        if let Some(Target::Local(path)) = &target {
            local_dests.push(LocalDest {
                path: path.clone(),
                span: raw.dest.span(),
                key: dest_key.clone(),
            });
        }
        // The kind of target decides whether `password_file` and `ssh` belong; with a bad
        // dest it is unknown, so those two checks wait for the dest to be fixed.
        let kind = target.as_ref().map(Target::kind);

        let name = match &raw.name {
            Some(name) if name.get_ref().is_empty() => {
                found.push(self.error(&name.span(), format!("{key}.name"), "name is empty"));
                None
            }
            Some(name) => Some(name.get_ref().clone()),
            None => Some(dest.clone().into_owned()),
        };

        let password_file = match &raw.password_file {
            None => Some(None),
            Some(file) => {
                let pkey = format!("{key}.password_file");
                let why = match kind {
                    Some(TargetKind::Local) => Some("is a local directory"),
                    Some(TargetKind::Ssh) => {
                        Some("goes over ssh, which authenticates with ssh keys")
                    }
                    Some(TargetKind::Daemon) | None => None,
                };
                if let Some(why) = why {
                    found.push(self.error(
                        &file.span(),
                        pkey,
                        format!(
                            "password_file is only for rsync daemon targets (host::module or rsync://...), and {dest} {why}"
                        ),
                    ));
                    None
                } else {
                    found.keep(self.absolute(file, &pkey)).map(|path| {
                        password_files.push((file.span(), pkey, path.clone()));
                        Some(path)
                    })
                }
            }
        };

        let rsync_args = found.keep(self.rsync_args(&raw.rsync_args, &format!("{key}.rsync_args")));
        let ssh_key = format!("{key}.ssh");
        let ssh = match &raw.ssh {
            Some(cmd) if kind.is_some_and(|k| k != TargetKind::Ssh) => {
                found.push(self.error(
                    &cmd.span(),
                    ssh_key,
                    format!("ssh is only for ssh targets (host:/path), and {dest} is not one"),
                ));
                None
            }
            ssh => found.keep(self.command(
                ssh.as_ref(),
                &ssh_key,
                "expected the ssh command, program first: [\"ssh\", \"-p\", \"2222\"]",
            )),
        };
        let max_backlog = found.keep(self.count(
            raw.max_backlog.as_ref(),
            &format!("{key}.max_backlog"),
            defaults::MAX_BACKLOG as u64,
            1,
        ));
        let post_sync = found.keep(self.command(
            raw.post_sync.as_ref(),
            &format!("{key}.post_sync"),
            "expected the command, program first (run without a shell, the synced paths on stdin): [\"/usr/local/bin/reindex\", \"--quiet\"]",
        ));

        found.into_result()?;
        let (
            Some(target),
            Some(name),
            Some(password_file),
            Some(rsync_args),
            Some(ssh),
            Some(max_backlog),
            Some(post_sync),
        ) = (
            target,
            name,
            password_file,
            rsync_args,
            ssh,
            max_backlog,
            post_sync,
        )
        else {
            unreachable!("a key left without a value has an error");
        };
        Ok(TargetConfig {
            name,
            dest: target,
            password_file,
            rsync_args,
            ssh,
            max_backlog: usize::try_from(max_backlog).unwrap_or(usize::MAX),
            post_sync,
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
                let line = self.line(&spans[first].header);
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
                if let Err(e) = Target::Local(dest.path.clone()).check_overlap(&group.source) {
                    return Err(self.error(
                        &dest.span,
                        dest.key.clone(),
                        format!("{e} (sync[{i}])"),
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

/// An include with nothing to match: holds the place of an include pattern that is
/// refused, among the patterns compiled to find the other errors.
const NO_INCLUDE: &str = "+ ";
/// A plain exclude that compiles: holds the place of an exclude pattern the compiler
/// refused, so the patterns after it are compiled too and read as before (it is a rule,
/// as the refused pattern would have been).
const STAND_IN_EXCLUDE: &str = "stand-in";

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
