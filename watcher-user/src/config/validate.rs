//! The rules: from the file as written ([`super::schema`]) to the checked values of
//! [`super::Config`], each failure placed at its key by [`Ctx::error`].

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::errors::{ConfigError, position, read, syntax_error_key};
use super::schema::{RawDaemon, RawFile, RawGroup, RawTarget, defaults};
use super::{Config, DaemonConfig, GroupConfig, TargetConfig};
use crate::backend::BackendKind;
use crate::filter::Excludes;
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

pub(super) struct Ctx<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl Ctx<'_> {
    pub(super) fn error(
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

    pub(super) fn config(&self) -> Result<(Config, PasswordFiles), ConfigError> {
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
                key: syntax_error_key(table.get_ref(), self.text, &span).unwrap_or_default(),
                message: error.message().to_owned(),
            });
        }
        let span = table.span();
        let document = DeValue::Table(table.into_inner());
        read::<RawFile>(&document, span).map_err(|misfit| {
            let (span, key) = misfit.at.clone().unwrap_or((0..0, String::new()));
            self.error(&span, key, misfit.message())
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

        let mut patterns = Vec::with_capacity(raw.exclude.len());
        for (j, pattern) in raw.exclude.iter().enumerate() {
            if pattern.get_ref().is_empty() {
                return Err(self.error(
                    &pattern.span(),
                    format!("{key}.exclude[{j}]"),
                    "empty exclude pattern",
                ));
            }
            patterns.push(pattern.get_ref().clone());
        }
        // Compiled here, as the event filter will, so that `config check` refuses what
        // `run` would.
        let excludes = Excludes::compile(&patterns).map_err(|e| {
            let at = e.index.unwrap_or(0);
            let span = raw.exclude.get(at).map_or(header.clone(), |p| p.span());
            let key = match e.index {
                Some(j) => format!("{key}.exclude[{j}]"),
                None => format!("{key}.exclude"),
            };
            self.error(&span, key, e.to_string())
        })?;
        let rsync_args = self.rsync_args(&raw.rsync_args, &format!("{key}.rsync_args"))?;

        let delay_key = format!("{key}.delay_ms");
        let max_delay_key = format!("{key}.max_delay_ms");
        let delay = self.count(raw.delay_ms.as_ref(), &delay_key, defaults::DELAY_MS, 0)?;
        let max_delay = self.count(
            raw.max_delay_ms.as_ref(),
            &max_delay_key,
            defaults::MAX_DELAY_MS,
            0,
        )?;
        let max_batch = self.count(
            raw.max_batch.as_ref(),
            &format!("{key}.max_batch"),
            defaults::MAX_BATCH as u64,
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
            hard_links: raw.hard_links.unwrap_or(defaults::HARD_LINKS),
            flush: FlushConfig {
                delay: Duration::from_millis(delay),
                max_delay: Duration::from_millis(max_delay),
                max_batch: usize::try_from(max_batch).unwrap_or(usize::MAX),
            },
            initial_sync: raw.initial_sync.unwrap_or(defaults::INITIAL_SYNC),
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
        let target = Target::parse(OsStr::new(dest)).map_err(|e| {
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
        })?;
        target
            .check_overlap(source)
            .map_err(|e| dest_error(e.to_string()))?;
        if let Target::Local(path) = &target {
            local_dests.push(LocalDest {
                path: path.clone(),
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
                let why = match target.kind() {
                    TargetKind::Daemon => None,
                    TargetKind::Local => Some("is a local directory"),
                    TargetKind::Ssh => Some("goes over ssh, which authenticates with ssh keys"),
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
        let max_backlog = self.count(
            raw.max_backlog.as_ref(),
            &format!("{key}.max_backlog"),
            defaults::MAX_BACKLOG as u64,
            1,
        )?;
        Ok(TargetConfig {
            name,
            dest: target,
            password_file,
            rsync_args,
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
