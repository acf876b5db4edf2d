//! `watcher-bench`: the watcher daemon against the classic inotifywait scripts, lsyncd
//! and plain rsync, each started for real on the same generated trees.
//!
//! Scenarios: `ready` (start-up on trees of growing size, cold and warm), `latency` (one
//! change at a time), `burst` (many new files at once), `churn` (mixed operations at a
//! steady rate, then convergence), `scale` (event rate the daemon takes in, and the
//! criterion microbenchmark of its filter and dirty set), `kernel` (ebpf against
//! fanotify), and when named `ssh` (lone changes to an ssh target) and `rename` (a
//! directory and a large file renamed, on local, rsync-daemon and ssh targets). Results:
//! a Markdown table and SVG plots in `--results DIR`.
//!
//! Run as root (fanotify filesystem marks, dropping caches, cgroups and loop mounts need
//! it). Every child runs in a process group of its own and is killed when the harness
//! stops; the generated trees, cgroups and the loop image are removed.

mod breakdown;
mod comp;
mod image;
mod kernel;
mod proc;
mod rename;
mod report;
mod rsyncd;
mod scen;
mod sshd;
mod svg;
mod tree;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use crate::comp::Comp;
use crate::image::LoopImage;
use crate::report::Report;
use crate::scen::{Ctx, Sizes};
use crate::svg::Chart;

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Scenario {
    Ready,
    Latency,
    Burst,
    Churn,
    Scale,
    Kernel,
    /// Lone-change latency to an ssh target on 127.0.0.1 against a local target, and the
    /// ssh authentications for 100 lone changes.
    Ssh,
    /// A 2,000-file, 200 MiB directory and a 50 MiB file renamed, on local, rsync-daemon
    /// and ssh targets (servers on 127.0.0.1): bytes written on the replica's own loop
    /// device and time until in step.
    Rename,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Scale {
    /// Trees of 10^4 and 10^5 files for `ready`, 10^4-file trees elsewhere, a
    /// 10,000-file burst; 3 runs each. Under 10 minutes on 2 cores.
    Small,
    /// Trees of 10^4, 10^5 and 10^6 files for `ready`, 10^5-file trees elsewhere, a
    /// 100,000-file burst; 1 run each.
    Large,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Cache {
    Warm,
    Cold,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmarks the watcher daemon against inotifywait scripts, lsyncd and rsync"
)]
struct Cli {
    /// Scenarios to run, in this order (default: all).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,

    #[arg(long, value_enum, default_value_t = Scale::Small)]
    scale: Scale,

    /// Runs of each measurement (default: 3 for small, 1 for large).
    #[arg(long)]
    repeat: Option<usize>,

    /// Competitors (default: all whose programs are installed).
    #[arg(long = "only", value_enum, value_delimiter = ',')]
    only: Vec<Comp>,

    /// Cache states of `ready` (default: warm,cold).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "warm,cold")]
    cache: Vec<Cache>,

    /// Where the Markdown table and the SVG plots go.
    #[arg(long, default_value = "bench/results")]
    results: PathBuf,

    /// Directory under which a scratch directory is made (and removed) for the trees;
    /// default: the system's temporary directory (or the loop image).
    #[arg(long)]
    workdir: Option<PathBuf>,

    /// Create an ext4 image of this size (e.g. `8G`) in the work directory's parent
    /// (or /var/tmp), loop-mount it and run there; unmounted and removed at the end.
    #[arg(long, value_name = "SIZE")]
    loop_image: Option<String>,

    /// The watcher binary; default: `watcher` next to this program.
    #[arg(long)]
    watcher: Option<PathBuf>,

    /// Extra argument for `watcher sync` (repeatable).
    #[arg(long = "watcher-arg", allow_hyphen_values = true)]
    watcher_args: Vec<String>,

    /// Skip the criterion microbenchmark of `scale`.
    #[arg(long)]
    no_criterion: bool,

    /// Echo the output of the competitors on stderr.
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

pub(crate) fn run_ok(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

/// Writes back a sysctl's old value when dropped.
struct SysctlOverride {
    path: &'static str,
    old: String,
}

impl Drop for SysctlOverride {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.old);
    }
}

/// Ok(false) when a scenario failed but the results were still written.
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
        bail!("run as root: fanotify marks, dropping caches and cgroups need it");
    }
    if !proc::on_path("lsyncd") && proc::on_path("apt-get") {
        eprintln!("installing lsyncd with apt-get");
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "lsyncd"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    let mut comps: Vec<Comp> = if cli.only.is_empty() {
        Comp::ALL.to_vec()
    } else {
        cli.only.clone()
    };
    let mut notes = Vec::new();
    comps.retain(|c| match c.needs() {
        Some(p) if !proc::on_path(p) => {
            notes.push(format!("{} skipped: `{p}` is not installed", c.name()));
            false
        }
        _ => true,
    });
    if comps.contains(&Comp::Ebpf)
        && let Err(why) = ebpf_support(&watcher)
    {
        notes.push(format!("{} skipped: {why}", Comp::Ebpf.name()));
        comps.retain(|c| *c != Comp::Ebpf);
    }

    let base = cli.workdir.clone().unwrap_or_else(std::env::temp_dir);
    let image = match &cli.loop_image {
        Some(size) => {
            let dir = cli
                .workdir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/tmp"));
            eprintln!(
                "creating and mounting a {size} ext4 image in {}",
                dir.display()
            );
            Some(LoopImage::create(&dir, size)?)
        }
        None => None,
    };
    let base = image.as_ref().map_or(base, |i| i.mount.clone());
    let scratch = tempfile::Builder::new()
        .prefix("watcher-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch directory in {}", base.display()))?;
    let sizes = match cli.scale {
        Scale::Small => Sizes::small(),
        Scale::Large => Sizes::large(),
    };
    let repeat = cli
        .repeat
        .unwrap_or(match cli.scale {
            Scale::Small => 3,
            Scale::Large => 1,
        })
        .max(1);

    // Every inotify user needs a watch per directory; several may run at once.
    let biggest = sizes.ready_files.iter().max().copied().unwrap_or(0) / 10 * 11 / 10 + 10_000;
    let wanted = 4 * biggest;
    let path = "/proc/sys/fs/inotify/max_user_watches";
    let old = std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned();
    let _watches = match old.parse::<usize>() {
        Ok(n) if n < wanted => {
            std::fs::write(path, wanted.to_string()).context("raising max_user_watches")?;
            notes.push(format!("fs.inotify.max_user_watches raised from {n} to {wanted} for the run, restored afterwards"));
            Some(SysctlOverride { path, old })
        }
        _ => None,
    };
    let cgroups = proc::Cgroup::available();

    let mut ctx = Ctx {
        watcher,
        watcher_args: cli.watcher_args.clone(),
        workdir: scratch.path().to_owned(),
        echo: cli.verbose,
        cgroups,
        repeat,
        sizes,
        comps,
        cache: cli.cache.iter().map(|c| *c == Cache::Cold).collect(),
        criterion: !cli.no_criterion,
        report: Report::default(),
        ready_plot: Vec::new(),
        latency_plot: Vec::new(),
        burst_plot: Vec::new(),
    };
    for n in notes {
        ctx.report.note(n);
    }
    let scenarios = if cli.scenarios.is_empty() {
        let mut v = vec![
            Scenario::Ready,
            Scenario::Latency,
            Scenario::Burst,
            Scenario::Churn,
            Scenario::Scale,
        ];
        // The ebpf backend against fanotify: only when there is an ebpf backend to run.
        if ctx.comps.contains(&Comp::Ebpf) {
            v.push(Scenario::Kernel);
        }
        v
    } else {
        cli.scenarios.clone()
    };
    let fs_desc = filesystem(&base, image.is_some(), cli.loop_image.as_deref());
    let load_before = load_average();
    let started = std::time::Instant::now();
    let mut all_ok = true;
    for s in &scenarios {
        eprintln!("== {s:?}");
        let r = match s {
            Scenario::Ready => ctx.ready(),
            Scenario::Latency => ctx.latency(),
            Scenario::Burst => ctx.burst(),
            Scenario::Churn => ctx.churn(),
            Scenario::Scale => ctx.scale(),
            Scenario::Kernel => ctx.kernel(),
            Scenario::Ssh => ctx.ssh(),
            Scenario::Rename => ctx.rename(),
        };
        if let Err(e) = r {
            proc::check_interrupted()?;
            all_ok = false;
            let msg = report::hide_workdir(&format!("{e:#}"), &ctx.workdir);
            ctx.report.note(format!("scenario `{s:?}` failed: {msg}"));
        }
    }

    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--watcher="))
        .collect();
    let mut shown_args = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--watcher" {
            skip = true;
            continue;
        }
        shown_args.push(a);
    }
    ctx.report.header = vec![
        format!("command: `cargo xtask bench {}`", shown_args.join(" ")),
        format!(
            "scale: {:?}, runs per measurement: {repeat}, total time {}",
            cli.scale,
            report::dur(started.elapsed())
        )
        .to_lowercase(),
        format!(
            "CPUs: {} ({})",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model()
        ),
        format!("memory: {}", mem_total()),
        format!("kernel: {}", first_line("uname", &["-sr"])),
        format!("filesystem: {fs_desc}"),
        format!("rsync: {}", first_line("rsync", &["--version"])),
        format!("inotifywait: {}", first_line("inotifywait", &["--help"])),
        format!("lsyncd: {}", first_line("lsyncd", &["--version"])),
        format!(
            "CPU accounting: {}",
            if cgroups {
                "a cgroup v2 per competitor (`cpu.stat` `usage_usec`)"
            } else {
                "`/proc/PID/stat` of the process tree (no writable cgroup v2)"
            }
        ),
        format!(
            "load average (1, 5, 15 min) before / after: {load_before} / {}",
            load_average()
        ),
        format!(
            "other fanotify listeners (processes): {}",
            proc::fanotify_holders().len()
        ),
    ];

    std::fs::create_dir_all(&cli.results)
        .with_context(|| format!("creating {}", cli.results.display()))?;
    let charts = [
        (
            "ready.svg",
            "Start-up time vs tree size",
            Chart {
                title: "ready: spawn to ready".into(),
                x_label: "files in the tree".into(),
                y_label: "seconds (log)".into(),
                log_x: true,
                log_y: true,
                series: std::mem::take(&mut ctx.ready_plot),
            },
        ),
        (
            "latency.svg",
            "Latency distribution of a lone change",
            Chart {
                title: "latency: distribution (CDF)".into(),
                x_label: "milliseconds (log)".into(),
                y_label: "fraction of samples".into(),
                log_x: true,
                log_y: false,
                series: std::mem::take(&mut ctx.latency_plot),
            },
        ),
        (
            "burst.svg",
            "Burst convergence: replica files over time",
            Chart {
                title: "burst: replica files over time (first run)".into(),
                x_label: "seconds since the first write".into(),
                y_label: "burst files in the replica".into(),
                log_x: false,
                log_y: false,
                series: std::mem::take(&mut ctx.burst_plot),
            },
        ),
    ];
    for (file, caption, chart) in charts {
        if chart.series.is_empty() {
            continue;
        }
        let p = cli.results.join(file);
        std::fs::write(&p, chart.render()).with_context(|| format!("writing {}", p.display()))?;
        ctx.report.plots.push((file.to_owned(), caption.to_owned()));
    }
    let table = ctx.report.render();
    println!("{table}");
    let md = cli.results.join("RESULTS.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("results in {}", cli.results.display());
    drop(ctx);
    scratch.close().context("removing the scratch directory")?;
    drop(image);
    Ok(all_ok)
}

/// Whether `watcher check` says the ebpf backend loads here; why not otherwise.
fn ebpf_support(watcher: &Path) -> std::result::Result<(), String> {
    let out = Command::new(watcher)
        .arg("check")
        .output()
        .map_err(|e| format!("running `watcher check`: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("ebpf"))
        .ok_or_else(|| {
            "`watcher check` has no ebpf row (a watcher without the backend)".to_owned()
        })?;
    let mut words = row.split_whitespace().skip(1);
    if words.next() == Some("yes") {
        return Ok(());
    }
    let detail: Vec<&str> = words.skip(1).collect();
    Err(format!(
        "`watcher check`: {} (build with `--features watcher-user/ebpf`)",
        detail.join(" ")
    ))
}

fn filesystem(base: &Path, loop_image: bool, size: Option<&str>) -> String {
    // The mount with the longest mount point that contains `base`.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let ty = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(1)?, *f.get(2)?))
        })
        .filter(|(m, _)| base.starts_with(m))
        .max_by_key(|(m, _)| m.len())
        .map_or_else(|| "unknown".to_owned(), |(_, t)| t.to_owned());
    if loop_image {
        format!(
            "{ty} on a loop-mounted image of {} (`mkfs.ext4 -i 8192`)",
            size.unwrap_or("?")
        )
    } else {
        format!(
            "{ty} ({})",
            first_line("df", &["--output=source", &base.to_string_lossy()])
        )
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown model".to_owned())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or_else(
            || "unknown".to_owned(),
            |k| format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0),
        )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
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
