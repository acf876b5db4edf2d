//! Command line: `watcher sync`, `watcher run`, `watcher watch`, `watcher check`, ...

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::BackendKind;

/// Keeps a replica of a directory tree in step with the source, live: one kernel-wide
/// change feed (fanotify), a coalescing set of dirty paths, batched `rsync --files-from`.
#[derive(Debug, Parser)]
#[command(name = "watcher", version, propagate_version = true)]
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

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Source directory.
    pub source: PathBuf,
    /// Target: a local directory, `host::module`, `rsync://[user@]host[:port]/module`, or `host:/path` (ssh).
    pub target: OsString,
    /// Leave out paths matching this rsync-style pattern (`*.swp`, `.cache/`, `/build`); repeatable.
    #[arg(long = "exclude", value_name = "GLOB")]
    pub excludes: Vec<String>,
    /// Quiet period in milliseconds before a batch of changes is sent.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub delay: u64,
    /// Longest a change may wait while changes keep coming, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub max_delay: u64,
    /// Send a batch as soon as it holds this many paths.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_batch: usize,
    /// Change-capture backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Size of the ebpf backend's ring buffer in bytes (a power of two, at least 16 KiB);
    /// records that do not fit are lost and turn into a rescan of every root.
    #[arg(long, value_name = "BYTES", default_value_t = crate::backend::ebpf::DEFAULT_RINGBUF_BYTES)]
    pub ebpf_ringbuf_bytes: u32,
    /// Whether the ebpf backend's probes drop, in the kernel, changes to files outside
    /// every source root (other filesystems, other directories); `off` sends every
    /// change to user space, which filters it there (for measuring what the filter saves).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub ebpf_kernel_filter: Switch,
    /// Which probes the ebpf backend attaches: `vfs` (fentry/fexit on the kernel's VFS
    /// functions; also sees nfsd, io_uring and mmap writers) where the kernel accepts
    /// them, else `syscalls` (raw tracepoints); `auto` tries them in that order.
    #[arg(long, value_enum, default_value_t = crate::backend::ebpf::ProbeChoice::Auto)]
    pub ebpf_probes: crate::backend::ebpf::ProbeChoice,
    /// Skip the full `rsync -a --delete` at start-up (the target is known to be in step).
    #[arg(long)]
    pub no_initial_sync: bool,
    /// Extra argument for every rsync run (e.g. --rsync-arg=--password-file=FILE); repeatable.
    #[arg(long = "rsync-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub rsync_args: Vec<OsString>,
    /// Preserve hard links (rsync -H).
    #[arg(long)]
    pub hard_links: bool,
    /// The rsync binary to run.
    #[arg(long, value_name = "PATH", default_value = "rsync")]
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

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file.
    #[arg(long, short = 'c', value_name = "PATH", default_value = crate::config::DEFAULT_PATH)]
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
        #[arg(long, short = 'c', value_name = "PATH", default_value = crate::config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's status socket.
    #[arg(long, value_name = "PATH", default_value = "/run/watcher/status.sock")]
    pub socket: PathBuf,
    /// Print the raw JSON snapshot.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `KIND PATH` per line (PATH ends with / for directories).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Directories to watch (everything below them).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Change-capture backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
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
}
