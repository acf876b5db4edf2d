//! The scenarios: `ready`, `latency`, `burst`, `churn` and `scale`, each running every
//! competitor one after the other on the same generated tree; `ssh`, the daemon's lone
//! changes to an ssh target against a local one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::breakdown::{self, Breakdown};
use crate::comp::{self, Comp, Env, Running};
use crate::proc;
use crate::report::{Report, Section, Unit, dur, thousands};
use crate::sshd;
use crate::svg::Series;
use crate::tree::{self, SUBDIRS, Tree};

/// Lone changes per run of the `ssh` scenario (the issue's figure: authentications for 100).
const SSH_CHANGES: usize = 100;

/// Wait before the `Slab` reading after ready: the kernel folds its per-CPU counters into
/// `/proc/meminfo` only every `vm.stat_interval` (1 s).
const SLAB_LAG: Duration = Duration::from_millis(1100);
/// Per-sample timeout of the latency scenario.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Quiet time (no rsync running) before each latency sample.
const SAMPLE_GAP: Duration = Duration::from_millis(200);
/// Period of the replica file count samples of `burst`.
const BURST_SAMPLE: Duration = Duration::from_millis(200);

/// Median ready times of one competitor and cache state: (files, seconds).
type ReadyCurve = (Comp, bool, Vec<(f64, f64)>);

/// Sizes of one scale.
#[derive(Clone)]
pub struct Sizes {
    pub ready_files: Vec<usize>,
    pub tree_files: usize,
    pub burst_files: usize,
    pub burst_dirs: usize,
    pub burst_timeout: Duration,
    pub latency_samples: usize,
    pub churn_secs: u64,
    pub churn_rate: u64,
    pub converge_timeout: Duration,
    pub scale_secs: u64,
    /// New files of the `kernel` scenario (inside the root, and again outside it).
    pub kernel_files: usize,
    /// How long the replica may take to have the new files of `kernel`.
    pub kernel_timeout: Duration,
}

impl Sizes {
    pub fn large() -> Self {
        Self {
            ready_files: vec![10_000, 100_000, 1_000_000],
            tree_files: 100_000,
            burst_files: 100_000,
            burst_dirs: 1_000,
            burst_timeout: Duration::from_secs(300),
            latency_samples: 50,
            churn_secs: 30,
            churn_rate: 200,
            converge_timeout: Duration::from_secs(120),
            scale_secs: 15,
            kernel_files: 100_000,
            kernel_timeout: Duration::from_secs(300),
        }
    }

    pub fn small() -> Self {
        Self {
            ready_files: vec![10_000, 100_000],
            tree_files: 10_000,
            burst_files: 10_000,
            burst_dirs: 1_000,
            burst_timeout: Duration::from_secs(20),
            latency_samples: 50,
            churn_secs: 5,
            churn_rate: 100,
            converge_timeout: Duration::from_secs(30),
            scale_secs: 2,
            kernel_files: 50_000,
            kernel_timeout: Duration::from_secs(60),
        }
    }
}

pub struct Ctx {
    pub watcher: PathBuf,
    pub watcher_args: Vec<String>,
    pub workdir: PathBuf,
    pub echo: bool,
    pub cgroups: bool,
    pub repeat: usize,
    pub sizes: Sizes,
    pub comps: Vec<Comp>,
    pub cache: Vec<bool>,
    pub criterion: bool,
    pub report: Report,
    pub ready_plot: Vec<Series>,
    pub latency_plot: Vec<Series>,
    pub burst_plot: Vec<Series>,
}

fn color(c: Comp) -> usize {
    Comp::ALL.iter().position(|x| *x == c).unwrap_or(0)
}

impl Ctx {
    pub(crate) fn env(&self) -> Env<'_> {
        Env {
            watcher: &self.watcher,
            watcher_args: &self.watcher_args,
            workdir: &self.workdir,
            echo: self.echo,
            cgroups: self.cgroups,
        }
    }

    fn live(&self) -> Vec<Comp> {
        self.comps.iter().copied().filter(|c| c.is_live()).collect()
    }

    pub(crate) fn record(
        &mut self,
        scenario: &str,
        comp: Comp,
        src: &Path,
        dst: &Path,
    ) -> Result<()> {
        let lines = comp::command_lines(&self.env(), comp, src, dst)?;
        self.report
            .command(&format!("{scenario}: {}", comp.name()), lines);
        Ok(())
    }

    pub(crate) fn start(
        &mut self,
        scenario: &str,
        comp: Comp,
        tree: &Tree,
        dst: &Path,
    ) -> Result<Running> {
        self.record(scenario, comp, &tree.root, dst)?;
        comp::start(&self.env(), comp, &tree.root, dst, tree.dirs())
    }

    // ------------------------------------------------------------------------- ready

    pub fn ready(&mut self) -> Result<()> {
        let base = self.workdir.join("ready");
        let r = self.ready_in(&base);
        tree::remove(&base)?;
        r
    }

    fn ready_in(&mut self, base: &Path) -> Result<()> {
        let mut sec = Section::new(
            "ready: start-up on trees of growing size",
            vec![format!(
                "Spawn until every directory is covered: the daemon's `ready` line (fanotify: one mark; inotify: a watch per directory), one inotify watch per directory for the scripts and lsyncd (read from `/proc/PID/fdinfo`), for plain rsync a whole `rsync -a --delete` of the unchanged tree (what a rescan costs). Slab: system-wide `Slab` growth of `/proc/meminfo` {} after ready (warm runs only: after dropping the caches it measures the refill). RSS: the competitor's processes at ready. Cold: `echo 3 > /proc/sys/vm/drop_caches` before each run.",
                dur(SLAB_LAG)
            )],
            &[
                ("spawn to ready", Unit::Secs, true),
                ("CPU to ready", Unit::Secs, true),
                ("slab growth", Unit::Kib, false),
                ("RSS", Unit::Size, false),
            ],
        );
        let comps = self.comps.clone();
        let mut plot: Vec<ReadyCurve> = Vec::new();
        for (k, &files) in self.sizes.ready_files.clone().iter().enumerate() {
            let src = base.join(format!("src{k}"));
            let dst = base.join(format!("dst{k}"));
            eprintln!("ready: generating {} files ...", thousands(files));
            let (tree, took) = Tree::generate(&src, files)?;
            eprintln!("ready: generated in {}; seeding the replica", dur(took));
            seed(&tree.root, &dst)?;
            for &cold in &self.cache.clone() {
                let group = format!(
                    "{} files, {} dirs, {}",
                    thousands(tree.files()),
                    thousands(tree.dirs()),
                    if cold { "cold" } else { "warm" }
                );
                for rep in 0..self.repeat {
                    for &c in &comps {
                        proc::check_interrupted()?;
                        settle(cold)?;
                        let slab0 = proc::slab_kib()?;
                        let (after, cpu, slab, rss) = if c == Comp::Rsync {
                            self.record("ready", c, &tree.root, &dst)?;
                            let (wall, cpu) = comp::rsync_once(&self.env(), &tree.root, &dst)?;
                            (wall, cpu, None, None)
                        } else {
                            let r = match self.start("ready", c, &tree, &dst) {
                                Ok(r) => r,
                                Err(e) => {
                                    proc::check_interrupted()?;
                                    self.report
                                        .note(format!("ready ({group}, {}): {e:#}", c.name()));
                                    sec.push(&group, c, 0, None);
                                    continue;
                                }
                            };
                            let cpu = r.cpu();
                            let rss = tree_rss(r.pid());
                            let slab = if cold {
                                None
                            } else {
                                proc::sleep(SLAB_LAG)?;
                                Some(proc::slab_kib()? as f64 - slab0 as f64)
                            };
                            let after = r.ready_after;
                            r.stop()?;
                            (after, cpu, slab, Some(rss as f64))
                        };
                        eprintln!(
                            "ready: {group}, run {}: {} {}",
                            rep + 1,
                            c.name(),
                            dur(after)
                        );
                        sec.push(&group, c, 0, Some(after.as_secs_f64()));
                        sec.push(&group, c, 1, Some(cpu.as_secs_f64()));
                        if c != Comp::Rsync {
                            if !cold {
                                sec.push(&group, c, 2, slab);
                            }
                            sec.push(&group, c, 3, rss);
                        }
                    }
                }
                for &c in &comps {
                    if let Some(m) = sec
                        .lines
                        .iter()
                        .find(|l| l.group == group && l.comp == c)
                        .and_then(|l| crate::report::median(&l.cells[0]))
                    {
                        match plot.iter_mut().find(|p| p.0 == c && p.1 == cold) {
                            Some(p) => p.2.push((tree.files() as f64, m)),
                            None => plot.push((c, cold, vec![(tree.files() as f64, m)])),
                        }
                    }
                }
            }
            tree::remove(&src)?;
            tree::remove(&dst)?;
        }
        self.ready_plot = plot
            .into_iter()
            .map(|(c, cold, points)| Series {
                name: format!("{} ({})", c.name(), if cold { "cold" } else { "warm" }),
                points,
                dashed: cold,
                color: color(c),
            })
            .collect();
        self.report.sections.push(sec);
        Ok(())
    }

    // ----------------------------------------------------------------------- latency

    pub fn latency(&mut self) -> Result<()> {
        let base = self.workdir.join("latency");
        let r = self.latency_in(&base);
        tree::remove(&base)?;
        r
    }

    fn latency_in(&mut self, base: &Path) -> Result<()> {
        let n = self.sizes.latency_samples;
        let per_run = n.div_ceil(self.repeat);
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let dst = base.join("dst");
        seed(&tree.root, &dst)?;
        let mut sec = Section::new(
            "latency: one new file at a time",
            vec![format!(
                "One small new file in a random directory of a {}-file tree, the replica busy-polled (0.5 ms) until it has the full contents; {} of quiet (no rsync running) before each sample. {} samples per competitor ({per_run} in each of {} runs); p95, p99 and max over all of them, p50 also per run. Timeouts ({}) count as slower than any sample.",
                thousands(tree.files()),
                dur(SAMPLE_GAP),
                per_run * self.repeat,
                self.repeat,
                dur(SAMPLE_TIMEOUT)
            )],
            &[
                ("p50", Unit::Secs, true),
                ("p95", Unit::Secs, true),
                ("p99", Unit::Secs, true),
                ("max", Unit::Secs, false),
                ("timeouts", Unit::Count, false),
            ],
        );
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut pooled: Vec<(Comp, Vec<Option<Duration>>)> = Vec::new();
        let mut breakdowns: Vec<(Comp, Vec<Breakdown>)> = Vec::new();
        for rep in 0..self.repeat {
            for c in self.live() {
                let r = match self.start("latency", c, &tree, &dst) {
                    Ok(r) => r,
                    Err(e) => {
                        proc::check_interrupted()?;
                        self.report.note(format!("latency ({}): {e:#}", c.name()));
                        continue;
                    }
                };
                eprintln!(
                    "latency: run {}: {} ready; {per_run} samples",
                    rep + 1,
                    c.name()
                );
                let log = c.is_watcher().then_some(&r.log);
                let (s, parts) =
                    samples(&tree, &dst, r.pid(), per_run, c.key(), rep, &mut rng, log)?;
                r.stop()?;
                match breakdowns.iter_mut().find(|p| p.0 == c) {
                    Some(p) => p.1.extend(parts),
                    None => breakdowns.push((c, parts)),
                }
                sec.push("", c, 0, percentile(&s, 0.5).map(|d| d.as_secs_f64()));
                match pooled.iter_mut().find(|p| p.0 == c) {
                    Some(p) => p.1.extend(s),
                    None => pooled.push((c, s)),
                }
            }
        }
        for (c, s) in &pooled {
            for (col, p) in [(1, 0.95), (2, 0.99), (3, 1.0)] {
                sec.push("", *c, col, percentile(s, p).map(|d| d.as_secs_f64()));
            }
            sec.push(
                "",
                *c,
                4,
                Some(s.iter().filter(|v| v.is_none()).count() as f64),
            );
            let mut ok: Vec<f64> = s
                .iter()
                .flatten()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect();
            ok.sort_by(f64::total_cmp);
            let total = s.len() as f64;
            self.latency_plot.push(Series {
                name: c.name().to_owned(),
                points: ok
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (*v, (i + 1) as f64 / total))
                    .collect(),
                dashed: false,
                color: color(*c),
            });
        }
        self.report.sections.push(sec);
        if !breakdowns.is_empty() {
            self.report.sections.push(breakdown_section(&breakdowns));
        }
        Ok(())
    }

    // ------------------------------------------------------------------------- ssh

    pub fn ssh(&mut self) -> Result<()> {
        let base = self.workdir.join("ssh");
        let r = self.ssh_in(&base);
        tree::remove(&base)?;
        r
    }

    /// Lone changes to a local target and to the same machine over ssh (a real sshd on
    /// 127.0.0.1), one after the other in each run, and the authentications the server
    /// logged while the ssh target took [`SSH_CHANGES`] of them.
    fn ssh_in(&mut self, base: &Path) -> Result<()> {
        if !Path::new(sshd::SSHD).is_file() {
            self.report.note(format!(
                "ssh: skipped, no {} (cargo xtask setup installs openssh-server)",
                sshd::SSHD
            ));
            return Ok(());
        }
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let local = base.join("dst-local");
        let remote = base.join("dst-ssh");
        seed(&tree.root, &local)?;
        seed(&tree.root, &remote)?;
        let server = sshd::Sshd::start(&base.join("sshd"))?;
        let mut sec = Section::new(
            "ssh: lone changes to an ssh target",
            vec![format!(
                "The `latency` measurement ({} quiet before each sample, replica busy-polled) on a {}-file tree, {SSH_CHANGES} lone changes per run to a local target and then to `root@127.0.0.1:DST` through an OpenSSH server the harness starts on 127.0.0.1 (key authentication, `--rsync-arg=--rsh=ssh -p PORT -i KEY -o UserKnownHostsFile=FILE`), {} runs. p50 per run, p95 and max over all samples. Authentications: `Accepted publickey` lines the server logged from the daemon's start (its remote check) to the end of the samples; the daemon keeps one OpenSSH master connection per target, so the goal is 1.",
                dur(SAMPLE_GAP),
                thousands(tree.files()),
                self.repeat,
            )],
            &[
                ("p50", Unit::Secs, false),
                ("p95", Unit::Secs, false),
                ("max", Unit::Secs, false),
                ("timeouts", Unit::Count, false),
                ("ssh authentications", Unit::Count, false),
            ],
        )
        .with_ratios(&[], "");
        let dest = format!("root@127.0.0.1:{}", remote.display());
        let mut args = self.watcher_args.clone();
        args.push(server.rsh_arg());
        let mut rng = StdRng::seed_from_u64(0x0554);
        let mut pooled: [Vec<Option<Duration>>; 2] = [Vec::new(), Vec::new()];
        let mut p50s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..self.repeat {
            for (i, case) in ["local target", "ssh target"].into_iter().enumerate() {
                let before = server.accepted();
                let (dst, r) = if i == 0 {
                    (
                        local.as_path(),
                        self.start("ssh", Comp::Fanotify, &tree, &local)?,
                    )
                } else {
                    let dst = Path::new(&dest);
                    let env = Env {
                        watcher_args: &args,
                        ..self.env()
                    };
                    let lines = comp::command_lines(&env, Comp::Fanotify, &tree.root, dst)?;
                    let r = comp::start(&env, Comp::Fanotify, &tree.root, dst, tree.dirs())?;
                    self.report.command("ssh: watcher (ssh target)", lines);
                    (remote.as_path(), r)
                };
                eprintln!("ssh: run {}: {case}; {SSH_CHANGES} samples", rep + 1);
                let (s, _) = samples(
                    &tree,
                    dst,
                    r.pid(),
                    SSH_CHANGES,
                    "ssh",
                    rep * 2 + i,
                    &mut rng,
                    None,
                )?;
                let auths = server.accepted() - before;
                r.stop()?;
                let p50 = percentile(&s, 0.5).map(|d| d.as_secs_f64());
                sec.push(case, Comp::Fanotify, 0, p50);
                if i == 1 {
                    sec.push(case, Comp::Fanotify, 4, Some(auths as f64));
                }
                p50s[i].extend(p50);
                pooled[i].extend(s);
            }
        }
        let mut summary = Vec::new();
        for (i, case) in ["local target", "ssh target"].into_iter().enumerate() {
            let s = &pooled[i];
            for (col, p) in [(1, 0.95), (2, 1.0)] {
                sec.push(
                    case,
                    Comp::Fanotify,
                    col,
                    percentile(s, p).map(|d| d.as_secs_f64()),
                );
            }
            let timeouts = s.iter().filter(|v| v.is_none()).count();
            sec.push(case, Comp::Fanotify, 3, Some(timeouts as f64));
            summary.push(format!(
                "{case}: p50 {}, p95 {}",
                percentile(s, 0.5).map_or("-".into(), dur),
                percentile(s, 0.95).map_or("-".into(), dur)
            ));
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        if let (Some(l), Some(r)) = (median(&p50s[0]), median(&p50s[1])) {
            summary.push(format!("p50 ssh / local: {:.2}x", r / l));
        }
        self.report.note(format!("ssh: {}", summary.join("; ")));
        server.stop()?;
        self.report.sections.push(sec);
        Ok(())
    }

    // ------------------------------------------------------------------------- burst

    pub fn burst(&mut self) -> Result<()> {
        let base = self.workdir.join("burst");
        let r = self.burst_in(&base);
        tree::remove(&base)?;
        r
    }

    fn burst_in(&mut self, base: &Path) -> Result<()> {
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let dst = base.join("dst");
        seed(&tree.root, &dst)?;
        let (nfiles, ndirs) = (self.sizes.burst_files, self.sizes.burst_dirs);
        let per_dir = nfiles.div_ceil(ndirs);
        let rel: Vec<PathBuf> = (0..ndirs)
            .map(|d| {
                PathBuf::from("burst")
                    .join(format!("b{:03}", d / 100))
                    .join(format!("b{:02}", d % 100))
            })
            .collect();
        let src_dirs: Vec<PathBuf> = rel.iter().map(|r| tree.root.join(r)).collect();
        let dst_dirs: Vec<PathBuf> = rel.iter().map(|r| dst.join(r)).collect();
        let total = per_dir * ndirs;
        let mut sec = Section::new(
            "burst: many new files at once",
            vec![format!(
                "{} new files in {} new directories written by {} threads into a {}-file tree that the competitor watches; time from the first write until the replica has every file (given up after {}), rsync processes started (the daemon's `rsync finished` and lsyncd's `Calling rsync` log lines; for the scripts sampled from the cgroup every 1 ms, a lower bound: most per-event runs are shorter), and the CPU time of the competitor and all its children ({}). Plain rsync: one `rsync -a --delete` after the writes.",
                thousands(total),
                thousands(ndirs),
                2,
                thousands(tree.files()),
                dur(self.sizes.burst_timeout),
                if self.cgroups {
                    "cgroup v2 `cpu.stat` `usage_usec`"
                } else {
                    "`/proc/PID/stat` utime+stime+cutime+cstime of the process tree"
                }
            )],
            &[
                ("first write to replica complete", Unit::Secs, true),
                ("writing the files", Unit::Secs, false),
                ("rsync processes", Unit::Count, true),
                ("CPU (tool + children)", Unit::Secs, true),
                ("replica files at the end", Unit::Count, false),
            ],
        );
        let mut given_up: Vec<Comp> = Vec::new();
        for rep in 0..self.repeat {
            for c in self.comps.clone() {
                if given_up.contains(&c) {
                    continue;
                }
                tree::remove(&tree.root.join("burst"))?;
                tree::remove(&dst.join("burst"))?;
                proc::check_interrupted()?;
                let out = if c == Comp::Rsync {
                    self.record("burst", c, &tree.root, &dst)?;
                    let start = Instant::now();
                    tree::write_files(&src_dirs, per_dir, &burst_content)?;
                    let written = start.elapsed();
                    let (_, cpu) = comp::rsync_once(&self.env(), &tree.root, &dst)?;
                    let done = start.elapsed();
                    let n = count_files(&dst_dirs);
                    BurstOut {
                        complete: Some(done),
                        written,
                        rsyncs: 1,
                        cpu,
                        files: n,
                        curve: vec![
                            (0.0, 0.0),
                            (written.as_secs_f64(), 0.0),
                            (done.as_secs_f64(), n as f64),
                        ],
                    }
                } else {
                    let r = match self.start("burst", c, &tree, &dst) {
                        Ok(r) => r,
                        Err(e) => {
                            proc::check_interrupted()?;
                            self.report.note(format!("burst ({}): {e:#}", c.name()));
                            continue;
                        }
                    };
                    let out =
                        burst_run(&r, &src_dirs, &dst_dirs, per_dir, self.sizes.burst_timeout)?;
                    r.stop()?;
                    out
                };
                eprintln!(
                    "burst: run {}: {}: {} ({} of {} files), {} rsyncs, CPU {}",
                    rep + 1,
                    c.name(),
                    out.complete.map_or_else(|| "incomplete".to_owned(), dur),
                    thousands(out.files),
                    thousands(total),
                    out.rsyncs,
                    dur(out.cpu)
                );
                if out.complete.is_none() {
                    given_up.push(c);
                    self.report.note(format!(
                        "burst ({}): the replica had {} of {} files after {}; {}",
                        c.name(),
                        thousands(out.files),
                        thousands(total),
                        dur(self.sizes.burst_timeout),
                        if rep + 1 < self.repeat {
                            "not repeated"
                        } else {
                            "given up"
                        }
                    ));
                } else {
                    let bad = verify(&dst_dirs, per_dir)?;
                    if bad > 0 {
                        self.report.note(format!(
                            "burst ({}): {bad} replica files with wrong contents",
                            c.name()
                        ));
                    }
                }
                sec.push("", c, 0, out.complete.map(|d| d.as_secs_f64()));
                sec.push("", c, 1, Some(out.written.as_secs_f64()));
                sec.push("", c, 2, Some(out.rsyncs as f64));
                sec.push("", c, 3, Some(out.cpu.as_secs_f64()));
                sec.push("", c, 4, Some(out.files as f64));
                if rep == 0 {
                    self.burst_plot.push(Series {
                        name: c.name().to_owned(),
                        points: out.curve,
                        dashed: false,
                        color: color(c),
                    });
                }
            }
        }
        self.report.sections.push(sec);
        Ok(())
    }

    // ------------------------------------------------------------------------- churn

    pub fn churn(&mut self) -> Result<()> {
        let base = self.workdir.join("churn");
        let r = self.churn_in(&base);
        tree::remove(&base)?;
        r
    }

    fn churn_in(&mut self, base: &Path) -> Result<()> {
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let dst = base.join("dst");
        seed(&tree.root, &dst)?;
        let ops = (self.sizes.churn_secs * self.sizes.churn_rate) as usize;
        let mut sec = Section::new(
            "churn: mixed operations at a steady rate",
            vec![format!(
                "{} seeded operations at {} per second for {} s in a subtree (`churn/`, 50 directories of 10 files at the start) of a {}-file tree: create (35%), modify (25%), rename a file (10%), delete a file (8%), mkdir with 3 files (10%), rename a directory (6%), `rm -rf` a directory (6%); the same sequence for every competitor. Then the replica is compared with `rsync -anic --delete src/ dst/` every 0.5 s until no line shows a content difference (a line not starting with `.`: `.` lines are attribute-only, such as directory times), given up after {}. CPU: the competitor and its children from the first operation until then.",
                thousands(ops),
                self.sizes.churn_rate,
                self.sizes.churn_secs,
                thousands(tree.files()),
                dur(self.sizes.converge_timeout)
            )],
            &[
                ("last op to converged", Unit::Secs, true),
                ("differing paths at the end", Unit::Count, false),
                ("of which content", Unit::Count, false),
                ("rsync processes", Unit::Count, true),
                ("CPU per 1,000 ops", Unit::Secs, true),
            ],
        );
        let mut given_up: Vec<Comp> = Vec::new();
        for rep in 0..self.repeat {
            for c in self.live() {
                if given_up.contains(&c) {
                    continue;
                }
                proc::check_interrupted()?;
                let area_src = tree.root.join("churn");
                tree::remove(&area_src)?;
                let start_dirs: Vec<PathBuf> =
                    (0..50).map(|d| area_src.join(format!("c{d:02}"))).collect();
                tree::write_files(&start_dirs, 10, &|d, f| format!("churn {d} {f}\n"))?;
                seed(&tree.root, &dst)?;
                let r = match self.start("churn", c, &tree, &dst) {
                    Ok(r) => r,
                    Err(e) => {
                        proc::check_interrupted()?;
                        self.report.note(format!("churn ({}): {e:#}", c.name()));
                        continue;
                    }
                };
                let counter = r.count_rsyncs();
                let cpu0 = r.cpu();
                let mut state = ChurnState::new(&tree.root, 0xc0ffee + rep as u64);
                let interval = Duration::from_secs_f64(1.0 / self.sizes.churn_rate as f64);
                let t0 = Instant::now();
                for i in 0..ops {
                    proc::check_interrupted()?;
                    let due = t0 + interval * i as u32;
                    if let Some(w) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(w);
                    }
                    state.step()?;
                }
                let end = Instant::now();
                let (converged, diff, content) =
                    converge(&tree.root, &dst, self.sizes.converge_timeout)?;
                let cpu = r.cpu().saturating_sub(cpu0);
                let rsyncs = r.rsync_runs().unwrap_or(counter.finish());
                r.stop()?;
                let after = converged.map(|t| t.saturating_duration_since(end));
                if after.is_none() {
                    given_up.push(c);
                    self.report.note(format!(
                        "churn ({}): {content} paths still differ in content {} after the last operation; {}",
                        c.name(),
                        dur(self.sizes.converge_timeout),
                        if rep + 1 < self.repeat { "not repeated" } else { "given up" }
                    ));
                }
                eprintln!(
                    "churn: run {}: {}: {} ops in {}, converged {}, {diff} differing ({content} content), CPU {}",
                    rep + 1,
                    c.name(),
                    ops,
                    dur(end - t0),
                    after.map_or_else(|| "never".to_owned(), dur),
                    dur(cpu)
                );
                sec.push("", c, 0, after.map(|d| d.as_secs_f64()));
                sec.push("", c, 1, Some(diff as f64));
                sec.push("", c, 2, Some(content as f64));
                sec.push("", c, 3, Some(rsyncs as f64));
                sec.push("", c, 4, Some(cpu.as_secs_f64() * 1000.0 / ops as f64));
            }
        }
        self.report.sections.push(sec);
        Ok(())
    }

    // ------------------------------------------------------------------------- scale

    pub fn scale(&mut self) -> Result<()> {
        let base = self.workdir.join("scale");
        let r = self.scale_in(&base);
        tree::remove(&base)?;
        r?;
        if self.criterion {
            self.microbench()?;
        }
        Ok(())
    }

    fn scale_in(&mut self, base: &Path) -> Result<()> {
        let (tree, _) = Tree::generate(&base.join("src"), 1000)?;
        let dst = base.join("dst");
        seed(&tree.root, &dst)?;
        let secs = self.sizes.scale_secs;
        let mut sec = Section::new(
            "scale: event rate the daemon takes in",
            vec![format!(
                "Two threads create empty files as fast as they can for {secs} s (1,000 per directory) while the daemon replicates; its `stopped` summary gives the events it read and the queue overflows (each one a full rescan). Events/s: events read / write time."
            )],
            &[
                ("files created/s", Unit::Num, false),
                ("events read/s", Unit::Num, false),
                ("overflows", Unit::Count, false),
                ("rsync runs", Unit::Count, false),
            ],
        );
        for _rep in 0..self.repeat {
            for c in [Comp::Fanotify, Comp::Inotify, Comp::Ebpf] {
                if !self.comps.contains(&c) {
                    continue;
                }
                proc::check_interrupted()?;
                tree::remove(&tree.root.join("scale"))?;
                tree::remove(&dst.join("scale"))?;
                let r = self.start("scale", c, &tree, &dst)?;
                let t0 = Instant::now();
                let created = create_fast(&tree.root.join("scale"), Duration::from_secs(secs))?;
                let took = t0.elapsed().as_secs_f64();
                let stopped = r.stop()?.unwrap_or_default();
                let field = |k: &str| -> Option<f64> {
                    stopped
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                };
                eprintln!(
                    "scale: {}: {} files, {stopped}",
                    c.name(),
                    thousands(created)
                );
                sec.push("", c, 0, Some(created as f64 / took));
                sec.push("", c, 1, field("backend_events").map(|e| e / took));
                sec.push("", c, 2, field("overflows"));
                sec.push("", c, 3, field("rsync_runs"));
            }
        }
        self.report.sections.push(sec);
        Ok(())
    }

    /// Runs the criterion benchmark `pipeline` through cargo and reports events/s/core.
    fn microbench(&mut self) -> Result<()> {
        let Some(cargo) = std::env::var_os("CARGO") else {
            self.report.note("scale: the criterion microbenchmark needs cargo (run through `cargo xtask bench`, or `cargo bench -p watcher-bench --bench pipeline`): skipped");
            return Ok(());
        };
        eprintln!("scale: cargo bench -p watcher-bench --bench pipeline");
        let args = [
            "bench",
            "-p",
            "watcher-bench",
            "--bench",
            "pipeline",
            "--",
            "--warm-up-time",
            "1",
            "--measurement-time",
            "3",
            "--output-format",
            "bencher",
        ];
        self.report.command(
            "scale: microbenchmark",
            vec![format!("cargo {}", args.join(" "))],
        );
        let out = Command::new(cargo)
            .args(args)
            .output()
            .context("running cargo bench")?;
        if !out.status.success() {
            bail!(
                "cargo bench failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut md = String::from(
            "\n## Pipeline microbenchmark (criterion, one core)\n\n100,000 events per iteration through `watcher::filter::Filter::lookup` (one root with three excludes, one in ten paths excluded, and a second root) and `watcher::dirty::DirtySet::mark` + `take`.\n\n| benchmark | time per 100,000 events | events/s per core |\n| --- | --- | --- |\n",
        );
        for l in text.lines().filter(|l| l.starts_with("test ")) {
            let name = l.split_whitespace().nth(1).unwrap_or("?");
            let ns: Option<f64> = l
                .split("bench:")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.replace(',', "").parse().ok());
            if let Some(ns) = ns {
                md.push_str(&format!(
                    "| {name} | {} | {} |\n",
                    dur(Duration::from_nanos(ns as u64)),
                    thousands((100_000.0 / (ns * 1e-9)) as usize)
                ));
            }
        }
        self.report.extra.push(md);
        Ok(())
    }
}

/// `rsync -a --delete src/ dst/` (seeding or resetting a replica).
pub(crate) fn seed(src: &Path, dst: &Path) -> Result<()> {
    let st = Command::new("rsync")
        .arg("-a")
        .arg("--delete")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .status()
        .context("running rsync")?;
    if !st.success() {
        bail!("seeding the replica with rsync failed: {st}");
    }
    Ok(())
}

/// Flushes dirty data, drops the caches when `cold`, and lets things settle.
fn settle(cold: bool) -> Result<()> {
    nix::unistd::sync();
    if cold {
        fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches")?;
    }
    proc::sleep(Duration::from_millis(300))
}

/// RSS of a process and its descendants, KiB.
fn tree_rss(root: i32) -> u64 {
    proc::rss_kib(root).unwrap_or(0)
        + proc::descendants(root)
            .iter()
            .map(|p| proc::rss_kib(p.pid).unwrap_or(0))
            .sum::<u64>()
}

fn percentile(samples: &[Option<Duration>], p: f64) -> Option<Duration> {
    let mut ok: Vec<Duration> = samples.iter().flatten().copied().collect();
    ok.sort();
    let n = samples.len();
    if n == 0 {
        return None;
    }
    let idx = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
    ok.get(idx).copied()
}

/// `n` latency samples; None marks a timeout.
/// The medians of each part of the watcher daemons' lone changes (see [`breakdown`]).
fn breakdown_section(all: &[(Comp, Vec<Breakdown>)]) -> Section {
    let mut columns: Vec<(&str, Unit, bool)> = breakdown::PARTS
        .iter()
        .map(|p| (*p, Unit::Secs, false))
        .collect();
    columns.push(("rsync runs", Unit::Count, false));
    columns.push(("samples", Unit::Count, false));
    let mut sec = Section::new(
        "latency breakdown: where a lone change's time goes (watcher)",
        vec![
            "Medians over the samples of the latency scenario, from the daemon's `batch timing` \
             lines (CLOCK_MONOTONIC, as the harness's clock): delivery (the write to the \
             engine taking the event in: kernel queue, read, translation), queued (to the \
             batch's start: the flush decision, a settle while the write had not ended), \
             planning (renames replayed, rsync runs planned), rsync (its processes, spawn to \
             exit), other (the rest of the batch), seen (the batch's end to the harness \
             reading the contents; it polls every 0.5 ms). rsync exits well after the data \
             is in place (it waits for its other processes in 20 ms steps), so its part can \
             exceed the whole latency and `seen` is then 0: that wait delays the next batch, \
             not this change."
                .to_owned(),
        ],
        &columns,
    );
    sec.ratios.clear();
    for (comp, parts) in all.iter().filter(|(_, parts)| !parts.is_empty()) {
        let median = |values: &mut Vec<f64>| -> Option<f64> {
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied()
        };
        for k in 0..breakdown::PARTS.len() {
            let mut values: Vec<f64> = parts.iter().map(|b| b.parts[k].as_secs_f64()).collect();
            sec.push("", *comp, k, median(&mut values));
        }
        let mut runs: Vec<f64> = parts.iter().map(|b| b.runs as f64).collect();
        sec.push("", *comp, breakdown::PARTS.len(), median(&mut runs));
        sec.push(
            "",
            *comp,
            breakdown::PARTS.len() + 1,
            Some(parts.len() as f64),
        );
    }
    sec
}

/// Lone changes, one at a time: how long each took to reach the replica (None: timed
/// out), and where the time went for those a watcher daemon (`log`) reported on.
#[allow(clippy::too_many_arguments)]
fn samples(
    tree: &Tree,
    dst: &Path,
    root_pid: i32,
    n: usize,
    tag: &str,
    rep: usize,
    rng: &mut StdRng,
    log: Option<&proc::LogTail>,
) -> Result<(Vec<Option<Duration>>, Vec<Breakdown>)> {
    let mut out = Vec::with_capacity(n);
    let mut parts = Vec::new();
    for i in 0..n {
        proc::wait_rsync_idle(root_pid, SAMPLE_GAP, Duration::from_secs(5))?;
        let leaf = Tree::leaf(rng.random_range(0..tree.tops), rng.random_range(0..SUBDIRS));
        let rel = leaf.join(format!("lat-{tag}-{rep}-{i:03}"));
        let content = format!("latency sample {tag} {rep} {i}\n");
        let (src, dst) = (tree.root.join(&rel), dst.join(&rel));
        let log_from = log.map_or(0, proc::LogTail::len);
        let wrote_us = breakdown::monotonic_us();
        let start = Instant::now();
        fs::write(&src, &content).with_context(|| format!("writing {}", src.display()))?;
        let deadline = start + SAMPLE_TIMEOUT;
        let sample = loop {
            if fs::read(&dst).is_ok_and(|b| b == content.as_bytes()) {
                break Some(start.elapsed());
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_micros(500));
        };
        let seen_us = breakdown::monotonic_us();
        proc::check_interrupted()?;
        if let (Some(log), Some(_)) = (log, sample) {
            // The batch's line comes once its runs are done: wait for it briefly.
            let _ = log.wait_for(log_from, Duration::from_millis(500), |l| {
                l.contains("batch timing")
            });
            let lines = log.lines_from(log_from);
            parts.extend(breakdown::find(
                lines.iter().map(String::as_str),
                wrote_us,
                seen_us,
            ));
        }
        out.push(sample);
    }
    Ok((out, parts))
}

struct BurstOut {
    complete: Option<Duration>,
    written: Duration,
    rsyncs: usize,
    cpu: Duration,
    files: usize,
    /// (seconds since the first write, replica files)
    curve: Vec<(f64, f64)>,
}

pub(crate) fn burst_content(d: usize, f: usize) -> String {
    format!("burst {d} {f}\n")
}

/// Files (not starting with a dot) in `dirs`.
fn count_files(dirs: &[PathBuf]) -> usize {
    dirs.iter().map(|d| tree::visible_entries(d)).sum()
}

fn burst_run(
    r: &Running,
    src_dirs: &[PathBuf],
    dst_dirs: &[PathBuf],
    per_dir: usize,
    timeout: Duration,
) -> Result<BurstOut> {
    let total = per_dir * dst_dirs.len();
    let counter = r.count_rsyncs();
    let cpu0 = r.cpu();
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        let dirs = dst_dirs.to_vec();
        thread::spawn(move || {
            let mut curve = vec![(0.0, 0.0)];
            let end = start + timeout + Duration::from_secs(5);
            while !done.load(Ordering::Relaxed) && Instant::now() < end {
                thread::sleep(BURST_SAMPLE);
                curve.push((start.elapsed().as_secs_f64(), count_files(&dirs) as f64));
            }
            curve
        })
    };
    let written = tree::write_files(src_dirs, per_dir, &burst_content).map(|_| start.elapsed());
    let waited = written
        .as_ref()
        .ok()
        .map(|_| tree::wait_complete(dst_dirs, per_dir, timeout.saturating_sub(start.elapsed())));
    let cpu = r.cpu().saturating_sub(cpu0);
    done.store(true, Ordering::Relaxed);
    let mut curve = sampler.join().unwrap_or_default();
    let rsyncs = r.rsync_runs().unwrap_or(counter.finish());
    let written = written?;
    let (at, left) = waited.unwrap_or(Ok((Instant::now(), 1)))?;
    let files = count_files(dst_dirs);
    let complete = (left == 0).then(|| at - start);
    if let Some(c) = complete {
        curve.push((c.as_secs_f64(), total as f64));
    }
    Ok(BurstOut {
        complete,
        written,
        rsyncs,
        cpu,
        files,
        curve,
    })
}

/// Number of replica files of the burst whose contents are wrong.
pub(crate) fn verify(dst_dirs: &[PathBuf], per_dir: usize) -> Result<usize> {
    let mut bad = 0;
    for (d, dir) in dst_dirs.iter().enumerate() {
        proc::check_interrupted()?;
        for f in 0..per_dir {
            let ok = fs::read(dir.join(tree::file_name(f)))
                .is_ok_and(|b| b == burst_content(d, f).as_bytes());
            bad += usize::from(!ok);
        }
    }
    Ok(bad)
}

/// Creates empty files from two threads as fast as possible for `d`; returns how many.
fn create_fast(root: &Path, d: Duration) -> Result<usize> {
    let end = Instant::now() + d;
    thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || -> Result<usize> {
                    let mut n = 0usize;
                    // Bounded: at most 50 million files per thread.
                    for dirno in 0..50_000usize {
                        let dir = root.join(format!("w{t}")).join(format!("d{dirno:05}"));
                        fs::create_dir_all(&dir)?;
                        for f in 0..1000 {
                            fs::File::create(dir.join(format!("f{f}")))?;
                            n += 1;
                        }
                        if Instant::now() >= end || proc::check_interrupted().is_err() {
                            break;
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in hs {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        }
        Ok(total)
    })
}

/// Polls `rsync -anic --delete` until no content difference is left or `timeout`.
/// Returns when it converged, and the differing lines (all, content) of the last check.
pub(crate) fn converge(
    src: &Path,
    dst: &Path,
    timeout: Duration,
) -> Result<(Option<Instant>, usize, usize)> {
    let deadline = Instant::now() + timeout;
    loop {
        proc::check_interrupted()?;
        // The replica was in step when the check started (it reads every file).
        let now = Instant::now();
        let out = Command::new("rsync")
            .args(["-anic", "--delete"])
            .arg(format!("{}/", src.display()))
            .arg(format!("{}/", dst.display()))
            .output()
            .context("running rsync -anic")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let content = lines.iter().filter(|l| !l.starts_with('.')).count();
        if content == 0 {
            return Ok((Some(now), lines.len(), 0));
        }
        if now >= deadline {
            return Ok((None, lines.len(), content));
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// The files and directories of the churn subtree, and the seeded operations on them.
struct ChurnState {
    root: PathBuf,
    files: Vec<PathBuf>,
    /// Directories relative to `root`; index 0 is `churn` itself, never removed.
    dirs: Vec<PathBuf>,
    rng: StdRng,
    next: usize,
}

impl ChurnState {
    fn new(root: &Path, seed: u64) -> Self {
        let mut dirs = vec![PathBuf::from("churn")];
        let mut files = Vec::new();
        for d in 0..50 {
            let dir = PathBuf::from("churn").join(format!("c{d:02}"));
            for f in 0..10 {
                files.push(dir.join(tree::file_name(f)));
            }
            dirs.push(dir);
        }
        Self {
            root: root.to_owned(),
            files,
            dirs,
            rng: StdRng::seed_from_u64(seed),
            next: 0,
        }
    }

    fn name(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn pick_dir(&mut self) -> PathBuf {
        let i = self.rng.random_range(0..self.dirs.len());
        self.dirs[i].clone()
    }

    fn step(&mut self) -> Result<()> {
        let roll = self.rng.random_range(0..100);
        let root = self.root.clone();
        let abs = |p: &Path| root.join(p);
        if self.files.is_empty() || roll < 35 {
            let d = self.pick_dir();
            let f = d.join(self.name("n"));
            fs::write(abs(&f), format!("new {}\n", self.next))?;
            self.files.push(f);
        } else if roll < 60 {
            let i = self.rng.random_range(0..self.files.len());
            use std::io::Write;
            let mut fh = fs::OpenOptions::new()
                .append(true)
                .open(abs(&self.files[i]))?;
            writeln!(fh, "modified {}", self.next)?;
            self.next += 1;
        } else if roll < 70 {
            let i = self.rng.random_range(0..self.files.len());
            let d = self.pick_dir();
            let to = d.join(self.name("r"));
            fs::rename(abs(&self.files[i]), abs(&to))?;
            self.files[i] = to;
        } else if roll < 78 {
            let i = self.rng.random_range(0..self.files.len());
            let f = self.files.swap_remove(i);
            fs::remove_file(abs(&f))?;
        } else if roll < 88 || self.dirs.len() < 2 {
            let parent = self.pick_dir();
            if parent.components().count() >= 5 {
                return Ok(());
            }
            let d = parent.join(self.name("m"));
            fs::create_dir(abs(&d))?;
            for f in 0..3 {
                let p = d.join(tree::file_name(f));
                fs::write(abs(&p), "x\n")?;
                self.files.push(p);
            }
            self.dirs.push(d);
        } else {
            let i = self.rng.random_range(1..self.dirs.len());
            let d = self.dirs[i].clone();
            if roll < 94 {
                let to = d
                    .parent()
                    .map_or_else(|| PathBuf::from("churn"), Path::to_path_buf)
                    .join(self.name("v"));
                fs::rename(abs(&d), abs(&to))?;
                let re = |p: &mut PathBuf| {
                    if let Ok(rest) = p.strip_prefix(&d) {
                        *p = to.join(rest);
                    }
                };
                self.files.iter_mut().for_each(re);
                self.dirs.iter_mut().for_each(re);
            } else {
                fs::remove_dir_all(abs(&d))?;
                self.files.retain(|p| !p.starts_with(&d));
                self.dirs.retain(|p| !p.starts_with(&d));
            }
        }
        Ok(())
    }
}
