//! `watcher-bench`: measures the watcher daemon against the classic inotifywait script.
//!
//! Scenarios:
//! - `ready`: time from spawn to `ready` on a large tree, kernel slab growth and RSS,
//!   against the time `inotifywait -r` takes to establish its watches; then the same
//!   for the fanotify backend, the inotify backend and `inotifywait -r` side by side on a
//!   tree with a given number of directories;
//! - `burst`: many new files at once, time until the replica has them all, and the
//!   number of rsync runs it took;
//! - `latency`: one small new file at a time, time until the replica has it.
//!
//! Run as root (fanotify filesystem marks need it). Every child runs in a process group
//! of its own and is killed when the harness stops, and the generated trees are removed.

mod proc;
mod report;
mod scenarios;
mod tree;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use crate::report::Report;
use crate::scenarios::{Backend, Ctx, Sizes};

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Scenario {
    Ready,
    Burst,
    Latency,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Scale {
    /// 100,000-file `ready` tree, 10,000 directories for the watch set-up comparison,
    /// 10,000-file trees for `burst` and `latency`.
    Small,
    /// 1,000,000-file `ready` tree, 100,000 directories for the watch set-up comparison,
    /// 100,000-file trees for `burst` and `latency`.
    Large,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmarks the watcher daemon against an inotifywait script"
)]
struct Cli {
    /// Scenarios to run, in this order (default: all).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,

    #[arg(long, value_enum, default_value_t = Scale::Large)]
    scale: Scale,

    /// Directory under which a scratch directory is made (and removed) for the trees;
    /// default: the system's temporary directory.
    #[arg(long)]
    workdir: Option<PathBuf>,

    /// The watcher binary; default: `watcher` next to this program.
    #[arg(long)]
    watcher: Option<PathBuf>,

    /// Also write the results table (Markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Backends `burst` and `latency` run the daemon with, one run each, e.g.
    /// `--backend fanotify,inotify` (`ready` always measures both).
    #[arg(
        long = "backend",
        value_enum,
        value_delimiter = ',',
        default_value = "fanotify"
    )]
    backends: Vec<Backend>,

    /// Directories (the root included) of the watch set-up comparison of `ready`;
    /// default: 100,000 (`--scale large`) or 10,000 (`--scale small`).
    #[arg(long)]
    setup_dirs: Option<usize>,

    /// Set fs.inotify.max_user_watches to this for `ready`, restored afterwards: a value
    /// below the tree's directories shows how each inotify user is refused (after which
    /// the limit is raised for a second run).
    #[arg(long)]
    max_user_watches: Option<usize>,

    /// Extra argument for `watcher sync` (repeatable), e.g. `--watcher-arg=--delay=5`
    /// (not `--backend`: use the option of this program).
    #[arg(long = "watcher-arg", allow_hyphen_values = true)]
    watcher_args: Vec<String>,

    /// Drop the page, dentry and inode caches before each `ready` measurement, so that
    /// `inotifywait -r` walks the tree from disk.
    #[arg(long)]
    cold: bool,

    /// Echo the output of the daemon and the competitors on stderr.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("watcher-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ok(false) when a scenario failed but a table was still printed.
fn run() -> Result<bool> {
    let cli = Cli::parse();
    proc::install_interrupt_handler()?;

    let watcher = match cli.watcher {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("this program has no parent directory")?
            .join("watcher"),
    };
    if !watcher.is_file() {
        bail!(
            "no watcher binary at {} (build it, or pass --watcher PATH)",
            watcher.display()
        );
    }
    if !proc::on_path("rsync") {
        bail!("rsync is not on PATH");
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("warning: not running as root; fanotify filesystem marks need root");
    }

    let base = cli.workdir.unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("watcher-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch directory in {}", base.display()))?;
    let mut sizes = match cli.scale {
        Scale::Small => Sizes::SMALL,
        Scale::Large => Sizes::LARGE,
    };
    if let Some(dirs) = cli.setup_dirs {
        if dirs == 0 {
            bail!("--setup-dirs must be at least 1");
        }
        sizes.setup_dirs = dirs;
    }
    let mut backends: Vec<Backend> = Vec::new();
    for b in cli.backends {
        if !backends.contains(&b) {
            backends.push(b);
        }
    }
    let inotifywait = proc::on_path("inotifywait");
    if !inotifywait {
        eprintln!("inotifywait is not on PATH (package inotify-tools): comparisons are skipped");
    }
    let mut ctx = Ctx {
        watcher,
        watcher_args: cli.watcher_args,
        workdir: scratch.path().to_owned(),
        sizes,
        echo: cli.verbose,
        inotifywait,
        cold: cli.cold,
        backends,
        max_user_watches: cli.max_user_watches,
        report: Report::default(),
    };

    let scenarios = if cli.scenarios.is_empty() {
        vec![Scenario::Ready, Scenario::Burst, Scenario::Latency]
    } else {
        cli.scenarios
    };
    let load_before = load_average();
    let fanotify_before = fanotify_holders();
    let mut all_ok = true;
    for s in scenarios {
        eprintln!("== {s:?}");
        let r = match s {
            Scenario::Ready => ctx.ready(),
            Scenario::Burst => ctx.burst(),
            Scenario::Latency => ctx.latency(),
        };
        if let Err(e) = r {
            proc::check_interrupted()?;
            all_ok = false;
            let msg = report::hide_workdir(&format!("{e:#}"), &ctx.workdir);
            ctx.report.note(format!("scenario `{s:?}` failed: {msg}"));
        }
    }

    let header = vec![
        format!("scale: {:?}", cli.scale).to_lowercase(),
        format!(
            "backends of `burst` and `latency`: {}",
            ctx.backends
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "fs.inotify.max_user_watches (outside the runs that change it): {}",
            std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
        ),
        format!(
            "caches before `ready`: {}",
            if cli.cold { "dropped (cold)" } else { "warm" }
        ),
        format!("kernel: {}", first_line("uname", &["-sr"])),
        format!(
            "CPUs: {}",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        format!("rsync: {}", first_line("rsync", &["--version"])),
        format!(
            "load average (1, 5, 15 min) before / after: {load_before} / {}",
            load_average()
        ),
        format!(
            "other fanotify listeners (processes) before / after: {fanotify_before} / {}",
            fanotify_holders()
        ),
        format!(
            "inotifywait: {}",
            if inotifywait {
                first_line("inotifywait", &["--help"])
            } else {
                "not installed".to_owned()
            }
        ),
    ];
    let table = ctx.report.render(&header);
    println!("{table}");
    if let Some(out) = cli.out {
        std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    scratch.close().context("removing the scratch directory")?;
    Ok(all_ok)
}

/// The first three fields of `/proc/loadavg`: other work on the machine skews the
/// numbers, the slab readings most (they are system-wide).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Processes that hold a fanotify group, as `N (comm, comm)`.
fn fanotify_holders() -> String {
    let holders = proc::fanotify_holders();
    if holders.is_empty() {
        return "0".to_owned();
    }
    let names: Vec<&str> = holders.iter().map(|p| p.comm.as_str()).collect();
    format!("{} ({})", holders.len(), names.join(", "))
}

/// First line of a command's output (stdout, else stderr), or `unknown`.
fn first_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
