//! Command line: `watcher sync`, `watcher run`, `watcher watch`, `watcher check`, ...

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::BackendKind;
use crate::config::{
    self, Config, ConfigError, OsText, RawDaemon, RawFile, RawGroup, RawTarget, Spanned, defaults,
};
use crate::target::{self, TargetKind};

/// Keeps a replica of a directory tree in step with the source, live: one kernel-wide
/// change feed (fanotify), a coalescing set of dirty paths, batched `rsync --files-from`.
#[derive(Debug, Parser)]
#[command(
    name = "watcher",
    version,
    propagate_version = true,
    after_help = "Exit status: 0 success; 1 an error (configuration, start-up, a failed sync or check); 2 a usage error (unknown option, bad value); `watch` and `status --wait-in-step` say what else they return.\nNO_COLOR set to anything but empty turns colours off."
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate SOURCE to TARGET and keep it in step until SIGINT/SIGTERM.
    Sync(SyncArgs),
    /// Run as a service from the configuration file (several trees and targets, journal, status).
    Run(RunArgs),
    /// Work with the configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show what the running daemon is doing, per sync group and target.
    Status(StatusArgs),
    /// Print changes under PATHs as they happen (like `inotifywait -mr`, without per-directory watches).
    Watch(WatchArgs),
    /// Show which backends this kernel and the filesystems of PATHs support, and why not.
    Check(CheckArgs),
    /// Print the completion script for a shell (bash, zsh, fish, ...).
    Completions(CompletionsArgs),
    /// Print the manual page watcher(1), or write it and one page per subcommand into DIR.
    Man(ManArgs),
}

/// An on/off option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl From<bool> for Switch {
    fn from(on: bool) -> Self {
        if on { Switch::On } else { Switch::Off }
    }
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Source directory.
    pub source: PathBuf,
    /// Target: a local directory, `host::module`, `rsync://[user@]host[:port]/module`, or `host:/path` (ssh).
    pub target: OsString,
    /// Leave out paths matching this rsync-style pattern (`*.swp`, `.cache/`, `/build`); repeatable.
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Keep paths matching this rsync-style pattern although an exclude matches them
    /// (rsync's --include, checked before every exclude: `--include='*/' --include='*.txt'
    /// --exclude='*'` keeps only .txt files); repeatable.
    #[arg(long = "include", value_name = "GLOB")]
    pub includes: Vec<String>,
    /// Leave out paths matching the patterns in FILE, one per line (blank lines and lines
    /// starting with `#` or `;` are skipped), as rsync's --exclude-from reads them.
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Option<PathBuf>,
    /// Which rsync runs delete on the replica what the source no longer has: `true`
    /// (all), `false` (none), `startup` (whole-tree passes only: the initial sync, rescans,
    /// verify), `running` (only the changes seen while running).
    #[arg(long, value_name = "WHEN", value_parser = ["true", "false", "startup", "running"], default_value = "true")]
    pub delete: String,
    /// Quiet period before a batch of changes is sent: milliseconds, or a duration with a
    /// unit (`100ms`, `1s`).
    #[arg(long, value_name = "MS|DURATION", default_value_t = defaults::DELAY_MS, value_parser = parse_millis)]
    pub delay: u64,
    /// Longest a change may wait while changes keep coming: milliseconds, or a duration
    /// with a unit (`2s`, `1m`).
    #[arg(long, value_name = "MS|DURATION", default_value_t = defaults::MAX_DELAY_MS, value_parser = parse_millis)]
    pub max_delay: u64,
    /// Send a batch as soon as it holds this many paths.
    #[arg(long, value_name = "N", default_value_t = defaults::MAX_BATCH)]
    pub max_batch: usize,
    /// Change-capture backend.
    #[arg(long, value_enum, default_value_t = defaults::BACKEND)]
    pub backend: BackendKind,
    /// Size of the ebpf backend's ring buffer in bytes (a power of two, at least 16 KiB);
    /// records that do not fit are lost and turn into a rescan of every root.
    #[arg(long, value_name = "BYTES", default_value_t = defaults::EBPF_RINGBUF_BYTES)]
    pub ebpf_ringbuf_bytes: u32,
    /// Whether the ebpf backend's probes drop, in the kernel, changes to files outside
    /// every source root (other filesystems, other directories); `off` sends every
    /// change to user space, which filters it there (for measuring what the filter saves).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::from(defaults::EBPF_KERNEL_FILTER))]
    pub ebpf_kernel_filter: Switch,
    /// Which probes the ebpf backend attaches: `vfs` (fentry/fexit on the kernel's VFS
    /// functions; also sees nfsd, io_uring and mmap writers) where the kernel accepts
    /// them, else `syscalls` (raw tracepoints); `auto` tries them in that order.
    #[arg(long, value_enum, default_value_t = defaults::EBPF_PROBES)]
    pub ebpf_probes: crate::backend::ebpf::ProbeChoice,
    /// Skip the full `rsync -a --delete` at start-up (the target is known to be in step).
    #[arg(long)]
    pub no_initial_sync: bool,
    /// Extra argument for every rsync run; repeatable. --rsync-arg=--password-file=FILE
    /// sets an rsync daemon target's password file (checked like `password_file` in the
    /// configuration: readable by its owner only).
    #[arg(long = "rsync-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub rsync_args: Vec<OsString>,
    /// Preserve hard links (rsync -H).
    #[arg(long)]
    pub hard_links: bool,
    /// Stop at mount points below SOURCE (rsync -x): filesystems mounted there are neither
    /// watched nor copied.
    #[arg(long, short = 'x')]
    pub one_file_system: bool,
    /// The rsync binary to run.
    #[arg(long, value_name = "PATH", default_value = defaults::RSYNC)]
    pub rsync: PathBuf,
    /// Log what each batch would change (rsync --dry-run --itemize-changes); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Journal unsynced changes in this directory, so a restart after a crash resumes them.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve `watcher status` on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub status_socket: Option<PathBuf>,
    /// Compare the whole tree with the target this often (e.g. 6h, 30m) and repair drift.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub verify_interval: Option<std::time::Duration>,
}

impl SyncArgs {
    /// The one-group configuration these options stand for, checked by the rules of the
    /// configuration file ([`config::from_options`]): a value the file refuses is refused
    /// here, with the option named. Relative paths are taken from the current directory,
    /// and `--rsync-arg=--password-file=FILE` is the target's `password_file`.
    pub fn config(&self) -> Result<Config, ConfigError> {
        config::from_options(&self.raw(), &sync_option)
    }

    fn raw(&self) -> RawFile {
        fn at<T>(value: T) -> Spanned<T> {
            Spanned::new(0..0, value)
        }
        fn name(value: impl ValueEnum) -> String {
            value
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        }
        fn count(n: impl TryInto<i64>) -> Spanned<i64> {
            at(n.try_into().unwrap_or(i64::MAX))
        }
        let mut password_file = None;
        let mut rsync_args = Vec::new();
        for arg in &self.rsync_args {
            match arg.as_bytes().strip_prefix(b"--password-file=") {
                Some(file) => {
                    password_file = Some(at(from_cwd(Path::new(OsStr::from_bytes(file)))))
                }
                None => rsync_args.push(at(OsText(arg.clone()))),
            }
        }
        let dest = if target::kind_of(&self.target) == TargetKind::Local && !self.target.is_empty()
        {
            from_cwd(Path::new(&self.target)).into_os_string()
        } else {
            self.target.clone()
        };
        let rsync = if self.rsync.components().count() > 1 {
            from_cwd(&self.rsync)
        } else {
            self.rsync.clone()
        };
        RawFile {
            daemon: Some(RawDaemon {
                backend: Some(at(name(self.backend))),
                state_dir: self.state_dir.as_deref().map(|d| at(from_cwd(d))),
                status_socket: self.status_socket.as_deref().map(|s| at(from_cwd(s))),
                metrics: None,
                metrics_allow_remote: None,
                rsync: Some(at(rsync)),
                ebpf_probes: Some(at(name(self.ebpf_probes))),
                ebpf_ringbuf_bytes: Some(count(self.ebpf_ringbuf_bytes)),
                ebpf_kernel_filter: Some(self.ebpf_kernel_filter == Switch::On),
                max_processes: None,
            }),
            sync: vec![at(RawGroup {
                name: Some(at("sync".to_owned())),
                source: at(from_cwd(&self.source)),
                include: self.includes.iter().cloned().map(at).collect(),
                exclude: self.excludes.iter().cloned().map(at).collect(),
                exclude_from: self.exclude_from.as_deref().map(|p| at(from_cwd(p))),
                rsync_args,
                hard_links: Some(self.hard_links),
                one_file_system: Some(self.one_file_system),
                delay_ms: Some(count(self.delay)),
                max_delay_ms: Some(count(self.max_delay)),
                max_batch: Some(count(self.max_batch)),
                initial_sync: Some(!self.no_initial_sync),
                delete: Some(at(match self.delete.as_str() {
                    "true" => crate::config::RawDelete::Bool(true),
                    "false" => crate::config::RawDelete::Bool(false),
                    word => crate::config::RawDelete::Word(word.to_owned()),
                })),
                verify_interval: self
                    .verify_interval
                    .map(|d| at(humantime::format_duration(d).to_string())),
                target: vec![at(RawTarget {
                    name: Some(at(self.target.to_string_lossy().into_owned())),
                    dest: at(OsText(dest)),
                    password_file,
                    rsync_args: Vec::new(),
                    ssh: None,
                    max_backlog: None,
                    post_sync: None,
                })],
            })],
        }
    }
}

/// `path`, made absolute against the current directory if it is relative (left as it is
/// if there is no current directory: the check then says it is not absolute).
fn from_cwd(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The option or argument of `watcher sync` that sets the configuration key `key`.
fn sync_option(key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let field = last.split('[').next().unwrap_or(last);
    let option = match field {
        "source" => "SOURCE",
        "target" | "dest" | "name" if key.contains(".target") => "TARGET",
        "exclude" => "--exclude",
        "include" => "--include",
        "exclude_from" => "--exclude-from",
        "delete" => "--delete",
        "rsync_args" | "password_file" => "--rsync-arg",
        "hard_links" => "--hard-links",
        "one_file_system" => "--one-file-system",
        "delay_ms" => "--delay",
        "max_delay_ms" => "--max-delay",
        "max_batch" => "--max-batch",
        "initial_sync" => "--no-initial-sync",
        "verify_interval" => "--verify-interval",
        "backend" => "--backend",
        "state_dir" => "--state-dir",
        "status_socket" => "--status-socket",
        "rsync" => "--rsync",
        "ebpf_probes" => "--ebpf-probes",
        "ebpf_ringbuf_bytes" => "--ebpf-ringbuf-bytes",
        "ebpf_kernel_filter" => "--ebpf-kernel-filter",
        _ => return key.to_owned(),
    };
    option.to_owned()
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file.
    #[arg(long, short = 'c', value_name = "PATH", default_value = defaults::CONFIG_PATH)]
    pub config: PathBuf,
    /// Log what each batch would change (rsync --dry-run --itemize-changes); change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration file without running anything.
    Check {
        /// Configuration file.
        #[arg(long, short = 'c', value_name = "PATH", default_value = defaults::CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's status socket [default: the one --config names, else /run/watcher/status.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Ask the daemon that runs this configuration file (its `status_socket`).
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the raw JSON snapshot.
    #[arg(long)]
    pub json: bool,
    /// Wait until every target is in step, then print the status: exit 0; exit 3 when
    /// --timeout passes first, 4 when a target has failed (the targets are named on stderr).
    /// Changes made before the call are taken into account.
    #[arg(long)]
    pub wait_in_step: bool,
    /// With --wait-in-step: how long to wait at most (e.g. 30s, 10m, 2h) [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "wait_in_step")]
    pub timeout: Option<std::time::Duration>,
}

/// An event `watcher watch -e` can select, named as inotifywait names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WatchEvent {
    Create,
    Modify,
    /// A file open for writing was closed.
    #[value(name = "close_write", alias = "close-write")]
    CloseWrite,
    Attrib,
    Delete,
    #[value(name = "moved_from", alias = "moved-from")]
    MovedFrom,
    #[value(name = "moved_to", alias = "moved-to")]
    MovedTo,
    /// moved_from and moved_to.
    Move,
    /// A watched path itself was deleted or moved away.
    #[value(name = "delete_self", alias = "delete-self")]
    DeleteSelf,
}

/// Milliseconds, or a duration with a unit (`100ms`, `1s`, `6h`): what `--delay`,
/// `--max-delay` and the `_ms` configuration keys take.
pub fn parse_millis(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) => Ok(n),
        Err(_) => humantime::parse_duration(s)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|e| format!("{e} (expected milliseconds or a duration such as 100ms, 1s)")),
    }
}

/// Seconds, or a duration with a unit (`500ms`, `2m`).
fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<u64>() {
        Ok(n) => Ok(std::time::Duration::from_secs(n)),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
Exit status: 0 when stopped by a signal, by the timeout or after the one event of \
--oneshot; 1 on an error; 2 on a usage error, or when --oneshot --timeout ran out before \
any event (as inotifywait does).")]
pub struct WatchArgs {
    /// Directories to watch (everything below them).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print only these events (comma-separated or repeated): create, modify, close_write,
    /// attrib, delete, moved_from, moved_to, move, delete_self. Rescans and overflows are
    /// always printed.
    #[arg(
        short = 'e',
        long = "event",
        value_enum,
        value_delimiter = ',',
        value_name = "EVENT"
    )]
    pub events: Vec<WatchEvent>,
    /// `text` (KIND PATH), `json` (one object per line, with a time), or an inotifywait
    /// format: %w the directory, %f the name, %e the event names, %T the time (--timefmt).
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub format: String,
    /// Same as --format json.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// How %T prints the time, strftime-like, in UTC: %Y %m %d %H %M %S %s %F %T %z %Z.
    #[arg(long, value_name = "FORMAT", default_value = "%F %T")]
    pub timefmt: String,
    /// Leave out paths matching this rsync-style pattern (`*.swp`, `.cache/`); repeatable.
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Exit after this long: seconds, or a duration with a unit (`500ms`, `2m`).
    #[arg(short = 't', long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<std::time::Duration>,
    /// Exit after the first event printed.
    #[arg(short = '1', long)]
    pub oneshot: bool,
    /// Accepted for inotifywait's sake: watching goes on until stopped unless --oneshot.
    #[arg(short = 'm', long, hide = true)]
    pub monitor: bool,
    /// Accepted for inotifywait's sake: watching is always recursive.
    #[arg(short = 'r', long, hide = true)]
    pub recursive: bool,
    /// Change-capture backend.
    #[arg(long, value_enum, default_value_t = defaults::BACKEND)]
    pub backend: BackendKind,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

impl WatchArgs {
    /// What to print and when to stop.
    pub fn options(&self) -> crate::watch::WatchOptions {
        let format = if self.json { "json" } else { &self.format };
        crate::watch::WatchOptions {
            output: crate::watch::Output::parse(format),
            timefmt: self.timefmt.clone(),
            events: self.events.clone(),
            excludes: self.excludes.clone(),
            oneshot: self.oneshot,
            timeout: self.timeout,
        }
    }

    /// The backend and its settings as given on the command line.
    pub fn backend_options(&self) -> crate::backend::BackendOptions {
        crate::backend::BackendOptions {
            kind: self.backend,
            ebpf: self.ebpf.options(),
            ..Default::default()
        }
    }
}

/// The ebpf backend's settings.
#[derive(Debug, Args)]
pub struct EbpfArgs {
    /// Size of the ebpf backend's ring buffer in bytes (a power of two, at least 16 KiB);
    /// records that do not fit are lost and turn into a rescan of every root.
    #[arg(long, value_name = "BYTES", default_value_t = crate::backend::ebpf::DEFAULT_RINGBUF_BYTES)]
    pub ebpf_ringbuf_bytes: u32,
    /// Whether the ebpf backend's probes drop, in the kernel, changes to files outside
    /// every watched path (other filesystems, other directories); `off` sends every
    /// change to user space, which filters it there.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub ebpf_kernel_filter: Switch,
    /// Which probes the ebpf backend attaches: `vfs` (fentry/fexit on the kernel's VFS
    /// functions; also sees nfsd, io_uring and mmap writers) where the kernel accepts
    /// them, else `syscalls` (raw tracepoints); `auto` tries them in that order.
    #[arg(long, value_enum, default_value_t = crate::backend::ebpf::ProbeChoice::Auto)]
    pub ebpf_probes: crate::backend::ebpf::ProbeChoice,
}

impl EbpfArgs {
    pub fn options(&self) -> crate::backend::ebpf::EbpfOptions {
        crate::backend::ebpf::EbpfOptions {
            ringbuf_bytes: self.ebpf_ringbuf_bytes,
            probes: self.ebpf_probes,
            kernel_filter: self.ebpf_kernel_filter == Switch::On,
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Paths whose filesystems to check (default: the current directory).
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell the script is for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write watcher.1 and watcher-SUBCOMMAND.1 into this directory instead.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("Exit status: 0 success; 1 an error"),
            "{help}"
        );
        assert!(help.contains("2 a usage error"), "{help}");
    }

    #[test]
    fn delays_take_units_and_plain_milliseconds() {
        let delays = |args: &[&str]| -> Result<(u64, u64), String> {
            let cli = Cli::try_parse_from(["watcher", "sync", "s", "d"].iter().chain(args))
                .map_err(|e| e.to_string())?;
            match cli.command {
                Command::Sync(a) => Ok((a.delay, a.max_delay)),
                other => panic!("not sync: {other:?}"),
            }
        };
        assert_eq!(
            delays(&["--delay", "1s", "--max-delay", "6h"]),
            Ok((1000, 21_600_000))
        );
        assert_eq!(
            delays(&["--delay", "250", "--max-delay", "100ms"]),
            Ok((250, 100))
        );
        let err = delays(&["--delay", "fast"]).unwrap_err();
        assert!(err.contains("expected milliseconds or a duration"), "{err}");
    }

    #[test]
    fn status_finds_its_socket_and_waits() {
        let status =
            |args: &[&str]| match Cli::try_parse_from(["watcher", "status"].iter().chain(args)) {
                Ok(Cli {
                    command: Command::Status(a),
                    ..
                }) => Ok(a),
                Ok(other) => panic!("not status: {other:?}"),
                Err(e) => Err(e.kind()),
            };
        let a = status(&[]).expect("parses");
        assert_eq!(
            (a.socket, a.config, a.wait_in_step, a.timeout),
            (None, None, false, None)
        );
        let a = status(&[
            "--config",
            "/etc/w.toml",
            "--wait-in-step",
            "--timeout",
            "1m 30s",
        ])
        .expect("parses");
        assert_eq!(a.config, Some(PathBuf::from("/etc/w.toml")));
        assert!(a.wait_in_step);
        assert_eq!(a.timeout, Some(std::time::Duration::from_secs(90)));
        assert_eq!(
            status(&["--socket", "/s", "--config", "/c"]).unwrap_err(),
            clap::error::ErrorKind::ArgumentConflict
        );
        assert_eq!(
            status(&["--timeout", "5s"]).unwrap_err(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            status(&["--wait-in-step", "--timeout", "soon"]).unwrap_err(),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn rsync_args_may_start_with_dashes() {
        let cli = Cli::try_parse_from([
            "watcher",
            "sync",
            "/src",
            "host::mod",
            "--rsync-arg",
            "--password-file=/p",
            "--exclude",
            "*.swp",
        ])
        .expect("parses");
        let Command::Sync(args) = cli.command else {
            panic!("not sync")
        };
        assert_eq!(args.rsync_args, [OsString::from("--password-file=/p")]);
        assert_eq!(args.excludes, ["*.swp"]);
    }

    fn sync_args(src: &Path, dst: &Path, extra: &[&str]) -> SyncArgs {
        let mut argv = vec![
            OsString::from("watcher"),
            "sync".into(),
            src.into(),
            dst.into(),
        ];
        argv.extend(extra.iter().map(OsString::from));
        let cli = Cli::try_parse_from(argv).expect("parses");
        let Command::Sync(args) = cli.command else {
            panic!("not sync")
        };
        args
    }

    /// The same values on `watcher sync`'s command line and in a configuration file:
    /// (options; `[daemon]`, `[[sync]]` and `[[sync.target]]` lines; the option and the key
    /// an error must name, empty when both accept; a fragment both messages hold; whether
    /// the two messages are the same text).
    #[allow(clippy::type_complexity)]
    const SAME_VALUES: &[(&[&str], [&str; 3], &str, &str, &str, bool)] = &[
        (
            &["--max-batch", "0"],
            ["", "max_batch = 0", ""],
            "--max-batch",
            "sync[0].max_batch",
            "must be at least 1, got 0",
            true,
        ),
        (
            &["--delay", "5000", "--max-delay", "100"],
            ["", "delay_ms = 5000\nmax_delay_ms = 100", ""],
            "--max-delay",
            "sync[0].max_delay_ms",
            "(100) is less than",
            false,
        ),
        // Left out, max_delay takes its default (1000) on both sides.
        (
            &["--delay", "5000"],
            ["", "delay_ms = 5000", ""],
            "--max-delay",
            "sync[0].delay_ms",
            "(5000)",
            false,
        ),
        (
            &["--ebpf-ringbuf-bytes", "4096"],
            ["ebpf_ringbuf_bytes = 4096", "", ""],
            "--ebpf-ringbuf-bytes",
            "daemon.ebpf_ringbuf_bytes",
            "must be at least 16384, got 4096",
            true,
        ),
        (
            &["--exclude", "*.swp", "--exclude", "*.[ch"],
            ["", "exclude = [\"*.swp\", \"*.[ch\"]", ""],
            "--exclude",
            "sync[0].exclude[1]",
            "invalid exclude pattern \"*.[ch\"",
            true,
        ),
        (
            &["--exclude", ""],
            ["", "exclude = [\"\"]", ""],
            "--exclude",
            "sync[0].exclude[0]",
            "empty exclude pattern",
            true,
        ),
        (
            &["--rsync-arg", "/etc"],
            ["", "rsync_args = [\"/etc\"]", ""],
            "--rsync-arg",
            "sync[0].rsync_args[0]",
            "\"/etc\" is not an rsync option",
            true,
        ),
        (
            &["--verify-interval", "0s"],
            ["", "verify_interval = \"0s\"", ""],
            "--verify-interval",
            "sync[0].verify_interval",
            "must be longer than zero",
            true,
        ),
        (
            &["--rsync-arg=--password-file=/p"],
            ["", "", "password_file = \"/p\""],
            "--rsync-arg",
            "sync[0].target[0].password_file",
            "password_file is only for rsync daemon targets",
            true,
        ),
        (
            &["--state-dir", "/var/lib/w", "--rsync", "/usr/bin/rsync"],
            [
                "state_dir = \"/var/lib/w\"\nrsync = \"/usr/bin/rsync\"",
                "",
                "",
            ],
            "",
            "",
            "",
            true,
        ),
        (
            &["--delay", "50", "--max-delay", "50", "--max-batch", "1"],
            ["", "delay_ms = 50\nmax_delay_ms = 50\nmax_batch = 1", ""],
            "",
            "",
            "",
            true,
        ),
        (
            &[
                "--ebpf-ringbuf-bytes",
                "16384",
                "--exclude",
                "*.swp",
                "--rsync-arg=-H",
            ],
            [
                "ebpf_ringbuf_bytes = 16384",
                "exclude = [\"*.swp\"]\nrsync_args = [\"-H\"]",
                "",
            ],
            "",
            "",
            "",
            true,
        ),
    ];

    #[test]
    fn sync_options_are_refused_where_the_file_refuses_the_same_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let (src, dst) = (root.join("src"), root.join("dst"));
        std::fs::create_dir(&src).expect("mkdir");
        for (options, [daemon, group, target], option, key, fragment, same_text) in SAME_VALUES {
            let text = format!(
                "[daemon]\n{daemon}\n[[sync]]\nname = \"sync\"\nsource = {src:?}\n{group}\n[[sync.target]]\ndest = {dst:?}\n{target}\n",
            );
            let from_file = config::parse(Path::new("w.toml"), &text);
            let from_options = sync_args(&src, &dst, options).config();
            if option.is_empty() {
                let (file, cli) = (from_file.expect(&text), from_options.expect(&text));
                assert_eq!(file.daemon, cli.daemon, "{options:?}");
                let (file, cli) = (&file.groups[0], &cli.groups[0]);
                assert_eq!(file.flush.delay, cli.flush.delay, "{options:?}");
                assert_eq!(file.flush.max_delay, cli.flush.max_delay, "{options:?}");
                assert_eq!(file.flush.max_batch, cli.flush.max_batch, "{options:?}");
                assert_eq!(file.excludes.patterns(), cli.excludes.patterns());
                assert_eq!(file.rsync_args, cli.rsync_args, "{options:?}");
                assert_eq!(file.targets[0].dest, cli.targets[0].dest, "{options:?}");
                continue;
            }
            let file_message = match from_file {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, *key, "{text}");
                    message
                }
                other => panic!("the file should be refused at {key}:\n{text}\n{other:?}"),
            };
            let cli_message = match from_options {
                Err(ConfigError::CommandLine { option: o, message }) => {
                    assert_eq!(o, *option, "{options:?}");
                    message
                }
                other => panic!("{options:?} should be refused naming {option}: {other:?}"),
            };
            assert!(file_message.contains(fragment), "{file_message}");
            assert!(cli_message.contains(fragment), "{cli_message}");
            if *same_text {
                assert_eq!(cli_message, file_message, "{options:?}");
            } else {
                assert!(cli_message.contains(option), "{cli_message}");
            }
        }
    }

    #[test]
    fn relative_sync_paths_are_taken_from_the_current_directory() {
        let cwd = std::env::current_dir().expect("cwd");
        let args = sync_args(
            Path::new("src"),
            Path::new("replica"),
            &["--rsync-arg=--password-file=pass", "--rsync", "rsync"],
        );
        let raw = args.raw();
        let group = raw.sync[0].get_ref();
        assert_eq!(group.source.get_ref(), &cwd.join("src"));
        let target = group.target[0].get_ref();
        assert_eq!(
            target.dest.get_ref().0,
            cwd.join("replica").into_os_string()
        );
        assert_eq!(
            target.name.as_ref().map(|n| n.get_ref().as_str()),
            Some("replica")
        );
        let password = target.password_file.as_ref().map(|p| p.get_ref().clone());
        assert_eq!(password, Some(cwd.join("pass")));
        assert!(group.rsync_args.is_empty());
        // A bare rsync is looked up in PATH, as in the file.
        let rsync = raw.daemon.as_ref().and_then(|d| d.rsync.as_ref());
        assert_eq!(
            rsync.map(|r| r.get_ref().as_path()),
            Some(Path::new("rsync"))
        );
    }

    #[test]
    fn every_sync_option_named_in_errors_exists() {
        let command = Cli::command();
        let sync = command.find_subcommand("sync").expect("sync");
        let longs: Vec<String> = sync
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        let positionals: Vec<String> = sync
            .get_positionals()
            .filter_map(|a| {
                a.get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
            })
            .collect();
        for key in [
            "daemon.backend",
            "daemon.state_dir",
            "daemon.status_socket",
            "daemon.rsync",
            "daemon.ebpf_probes",
            "daemon.ebpf_ringbuf_bytes",
            "daemon.ebpf_kernel_filter",
            "sync[0].source",
            "sync[0].exclude[3]",
            "sync[0].rsync_args[0]",
            "sync[0].hard_links",
            "sync[0].delay_ms",
            "sync[0].max_delay_ms",
            "sync[0].max_batch",
            "sync[0].initial_sync",
            "sync[0].verify_interval",
            "sync[0].target",
            "sync[0].target[0].dest",
            "sync[0].target[0].name",
            "sync[0].target[0].password_file",
        ] {
            let option = sync_option(key);
            assert!(
                longs.contains(&option) || positionals.contains(&option),
                "{key} -> {option}, not an option of watcher sync ({longs:?}, {positionals:?})"
            );
        }
    }
}
