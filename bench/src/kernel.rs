//! The `kernel` scenario: the ebpf backend against the fanotify backend, on the same
//! writes, one after the other. First 100,000 new files inside the watched root (events
//! or records delivered per second, CPU per 100,000 creates, time to a complete replica);
//! then a busy filesystem with a small root, the writes outside it, on the same
//! filesystem and on another one, with the ebpf backend's in-kernel filter on and off.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::comp::{Comp, Running, Summary};
use crate::proc;
use crate::report::{Section, Unit, dur, thousands};
use crate::scen::{self, Ctx};
use crate::tree::{self, Tree};

/// Files per directory of the writes.
const PER_DIR: usize = 100;
/// Files of the small root of the busy phase.
const SMALL_ROOT_FILES: usize = 100;
/// The figures are given per this many creates.
const PER: f64 = 100_000.0;
/// Longest wait for the one change in the root during the busy phase to reach the replica.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the daemon to finish what it read (its CPU time to stop growing).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the final `rsync -anic` comparison of the busy phase to show no
/// difference.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

/// Ratios shown under both tables.
const RATIOS: [(Comp, Comp); 3] = [
    (Comp::Ebpf, Comp::Fanotify),
    (Comp::EbpfUnfiltered, Comp::Fanotify),
    (Comp::EbpfUnfiltered, Comp::Ebpf),
];
const RATIO_NOTE: &str = "Ratios a / b of the medians (per-run range in brackets); `watcher (ebpf, kernel filter off)` / `watcher (ebpf)` is what the in-kernel filter saves (above 1: the filter lowers it):";

/// What the writer threads did.
struct Written {
    /// First create to last write (or delete).
    wall: Duration,
    /// CPU time of the writer threads (user + system): the system calls, and what the
    /// kernel does for a listener on them (fanotify events, eBPF probes), on this side.
    cpu: Duration,
    created: usize,
}

/// Progress of the writer threads, for what runs beside them.
struct Progress {
    created: AtomicUsize,
    finished: AtomicUsize,
    threads: usize,
}

impl Progress {
    fn done(&self) -> bool {
        self.finished.load(Ordering::Relaxed) >= self.threads
    }
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut ru: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { nix::libc::getrusage(nix::libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Two threads, each on half of `dirs`: create the directory, write `PER_DIR` small files
/// (`content(dir, file)`) into it as fast as they can, and with `delete` unlink them and
/// remove the directory again. `beside` runs on the calling thread meanwhile.
fn write<T>(
    dirs: &[PathBuf],
    delete: bool,
    content: &(dyn Fn(usize, usize) -> String + Sync),
    beside: impl FnOnce(&Progress) -> Result<T>,
) -> Result<(Written, T)> {
    let threads = 2;
    let progress = Progress {
        created: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        threads,
    };
    let chunk = dirs.len().div_ceil(threads).max(1);
    let start = Instant::now();
    let (results, other) = thread::scope(|s| {
        let p = &progress;
        let handles: Vec<_> = dirs
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || -> Result<(Duration, Instant)> {
                    let cpu0 = thread_cpu();
                    let r = (|| -> Result<()> {
                        for (k, dir) in part.iter().enumerate() {
                            proc::check_interrupted()?;
                            let d = c * chunk + k;
                            fs::create_dir_all(dir)
                                .with_context(|| format!("creating {}", dir.display()))?;
                            for f in 0..PER_DIR {
                                let path = dir.join(tree::file_name(f));
                                fs::write(&path, content(d, f))
                                    .with_context(|| format!("writing {}", path.display()))?;
                                p.created.fetch_add(1, Ordering::Relaxed);
                            }
                            if delete {
                                for f in 0..PER_DIR {
                                    fs::remove_file(dir.join(tree::file_name(f)))?;
                                }
                                fs::remove_dir(dir)?;
                            }
                        }
                        Ok(())
                    })();
                    let end = Instant::now();
                    p.finished.fetch_add(1, Ordering::Relaxed);
                    r.map(|()| (thread_cpu().saturating_sub(cpu0), end))
                })
            })
            .collect();
        let other = beside(p);
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a writer thread panicked")))
            })
            .collect();
        (results, other)
    });
    let mut cpu = Duration::ZERO;
    let mut end = start;
    for r in results {
        let (c, e) = r?;
        cpu += c;
        end = end.max(e);
    }
    Ok((
        Written {
            wall: end - start,
            cpu,
            created: progress.created.load(Ordering::Relaxed),
        },
        other?,
    ))
}

/// Waits until the daemon's own CPU time stops growing (it has processed what it read):
/// unchanged over 5 samples 100 ms apart (the counter ticks every 10 ms), at most
/// [`DRAIN_TIMEOUT`]. Returns false on timeout.
fn drain(r: &Running) -> Result<bool> {
    let end = Instant::now() + DRAIN_TIMEOUT;
    let mut last = r.own_cpu();
    let mut same = 0;
    while Instant::now() < end {
        proc::sleep(Duration::from_millis(100))?;
        let now = r.own_cpu();
        if now == last {
            same += 1;
            if same >= 5 {
                return Ok(true);
            }
        } else {
            same = 0;
            last = now;
        }
    }
    Ok(false)
}

/// A tmpfs of its own, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut me = Self {
            dir: dir.to_owned(),
            mounted: false,
        };
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4g,mode=0755", "watcher-bench"])
            .arg(dir)
            .status()
            .context("running mount")?;
        if !st.success() {
            bail!("mounting a tmpfs on {} failed: {st}", dir.display());
        }
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        for _ in 0..20 {
            if Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = fs::remove_dir(&self.dir);
                return;
            }
            thread::sleep(Duration::from_millis(250));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// `n` directories `kNN/kNN` (100 per top directory) under `base`.
fn dirs_under(base: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|d| {
            base.join(format!("k{:03}", d / 100))
                .join(format!("k{:02}", d % 100))
        })
        .collect()
}

/// Per [`PER`] creates.
fn per(v: f64, created: usize) -> f64 {
    v * PER / created.max(1) as f64
}

fn secs(d: Duration) -> Option<f64> {
    Some(d.as_secs_f64())
}

/// Daemon and rsync CPU of a run: (own, everything else in its cgroup or process tree).
fn cpu_split(r: &Running, total0: Duration, own0: Duration) -> (Duration, Duration) {
    let own = r.own_cpu().saturating_sub(own0);
    let total = r.cpu().saturating_sub(total0);
    (own, total.saturating_sub(own))
}

impl Ctx {
    pub fn kernel(&mut self) -> Result<()> {
        let base = self.workdir.join("kernel");
        let r = self.kernel_in(&base);
        let removed = tree::remove(&base);
        r?;
        removed
    }

    /// The competitors of the scenario: no watcher, then fanotify and ebpf when chosen.
    fn kernel_comps(&self) -> Vec<Comp> {
        let mut v = vec![Comp::Baseline];
        v.extend(
            [Comp::Fanotify, Comp::Ebpf]
                .into_iter()
                .filter(|c| self.comps.contains(c)),
        );
        v
    }

    fn kernel_in(&mut self, base: &Path) -> Result<()> {
        if !self.comps.contains(&Comp::Ebpf) {
            self.report.note(
                "kernel: watcher (ebpf) is not among the competitors (not built in, or left out with --only): fanotify alone",
            );
        }
        let tmpfs = Tmpfs::mount(&base.join("tmpfs"))?;
        self.kernel_inside(&base.join("inside"), &tmpfs.dir)?;
        self.kernel_busy(&base.join("busy"), &tmpfs.dir)?;
        drop(tmpfs);
        Ok(())
    }

    // -------------------------------------------------------------- inside the root

    fn kernel_inside(&mut self, base: &Path, other_fs: &Path) -> Result<()> {
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let replicas = [
            (
                "replica on another filesystem (tmpfs)",
                other_fs.join("inside-dst"),
            ),
            ("replica on the watched filesystem", base.join("dst")),
        ];
        for (_, dst) in &replicas {
            scen::seed(&tree.root, dst)?;
        }
        let ndirs = self.sizes.kernel_files.div_ceil(PER_DIR);
        let total = ndirs * PER_DIR;
        let timeout = self.sizes.kernel_timeout;
        let rel: Vec<PathBuf> = dirs_under(Path::new("kernel"), ndirs);
        let src_dirs: Vec<PathBuf> = rel.iter().map(|r| tree.root.join(r)).collect();
        let scaled = if total == PER as usize {
            String::new()
        } else {
            format!(
                " Fewer files than 100,000 at this scale: the CPU figures are scaled to 100,000 creates (x{:.1}).",
                PER / total as f64
            )
        };
        let mut sec = Section::new(
            "kernel: new files inside the root, ebpf vs fanotify",
            vec![
                format!(
                    "{} new files ({} new directories of {PER_DIR} small files) written by 2 threads of the harness as fast as they can into a {}-file tree the daemon watches (ready first; the same writes were made and removed once before the first run, unmeasured). First create until the replica has every file (polled; given up after {}); the contents are checked afterwards. Events/s: the events the daemon read (its `stopped` line) per second of write time; records/s: the records the ebpf probes put in the ring buffer (`ebpf backend stopped` line), per second of write time; both count from start to stop.{scaled}",
                    thousands(total),
                    thousands(ndirs),
                    thousands(tree.files()),
                    dur(timeout)
                ),
                "The replica first on another filesystem (a tmpfs the harness mounts), so that only the new files are changes on the watched filesystem, then beside the source on the watched filesystem, as in the other scenarios: there fanotify, one mark for the whole filesystem, also reports every write of the daemon's own rsync processes, which the daemon drops in user space, while the ebpf probes drop the records of the daemon and its children in the kernel.".to_owned(),
                format!(
                    "CPU per 100,000 creates: the daemon's own process (`/proc/PID/stat` utime + stime, all its threads), its rsync processes ({}, minus the daemon), and the writer threads of the harness (`getrusage(RUSAGE_THREAD)`): their system time holds what the kernel does for the listener on every write, fanotify's event queueing or the eBPF probes, which run in the writer's context. CPU counts from the first create until the replica is complete and the daemon's CPU time stopped growing. `no watcher`: the same writes with nothing listening.",
                    if self.cgroups {
                        "the competitor's cgroup v2 `cpu.stat` `usage_usec`"
                    } else {
                        "`/proc/PID/stat` cutime + cstime of the daemon, a lower bound"
                    }
                ),
            ],
            &[
                ("first create to replica complete", Unit::Secs, true),
                ("writing the files", Unit::Secs, true),
                ("events read/s", Unit::Num, false),
                ("ebpf records/s", Unit::Num, false),
                ("daemon CPU per 100,000", Unit::Secs, true),
                ("rsync CPU per 100,000", Unit::Secs, true),
                ("rsync runs", Unit::Count, false),
                ("writer CPU per 100,000", Unit::Secs, true),
                ("overflows", Unit::Count, false),
            ],
        )
        .with_ratios(&RATIOS[..1], RATIO_NOTE);
        let comps = self.kernel_comps();
        // Once unmeasured: the first writes on a fresh filesystem (and right after the
        // tree was generated) are slower than the later ones, which would favour whoever
        // runs second.
        eprintln!("kernel inside: warm-up writes");
        write(&src_dirs, false, &scen::burst_content, |_| Ok(()))?;
        tree::remove(&tree.root.join("kernel"))?;
        nix::unistd::sync();
        let mut given_up: Vec<(usize, Comp)> = Vec::new();
        for rep in 0..self.repeat {
            for (g, (group, dst)) in replicas.iter().enumerate() {
                let group = *group;
                let dst_dirs: Vec<PathBuf> = rel.iter().map(|r| dst.join(r)).collect();
                for &c in &comps {
                    // The writes alone do not depend on where the replica is.
                    if given_up.contains(&(g, c)) || (c == Comp::Baseline && g > 0) {
                        continue;
                    }
                    proc::check_interrupted()?;
                    tree::remove(&tree.root.join("kernel"))?;
                    tree::remove(&dst.join("kernel"))?;
                    nix::unistd::sync();
                    let content = scen::burst_content;
                    if c == Comp::Baseline {
                        let (w, ()) = write(&src_dirs, false, &content, |_| Ok(()))?;
                        eprintln!(
                            "kernel inside: run {}: {group}: {}: {} files written in {}, writer CPU {}",
                            rep + 1,
                            c.name(),
                            thousands(w.created),
                            dur(w.wall),
                            dur(w.cpu)
                        );
                        sec.push(group, c, 1, secs(w.wall));
                        sec.push(group, c, 7, Some(per(w.cpu.as_secs_f64(), w.created)));
                        continue;
                    }
                    let r = match self.start("kernel (inside the root)", c, &tree, dst) {
                        Ok(r) => r,
                        Err(e) => {
                            proc::check_interrupted()?;
                            self.report
                                .note(format!("kernel inside ({group}, {}): {e:#}", c.name()));
                            given_up.push((g, c));
                            continue;
                        }
                    };
                    let (total0, own0) = (r.cpu(), r.own_cpu());
                    let start = Instant::now();
                    let (w, ()) = write(&src_dirs, false, &content, |_| Ok(()))?;
                    let (at, left) = tree::wait_complete(
                        &dst_dirs,
                        PER_DIR,
                        timeout.saturating_sub(start.elapsed()),
                    )?;
                    let complete = (left == 0).then(|| at - start);
                    drain(&r)?;
                    let (own, rsync) = cpu_split(&r, total0, own0);
                    let summary = r.stop_summary()?;
                    let bad = if complete.is_some() {
                        scen::verify(&dst_dirs, PER_DIR)?
                    } else {
                        0
                    };
                    if complete.is_none() {
                        given_up.push((g, c));
                        self.report.note(format!(
                        "kernel inside ({group}, {}): {left} of {ndirs} directories incomplete in the replica after {}; {}",
                        c.name(),
                        dur(timeout),
                        if rep + 1 < self.repeat { "not repeated" } else { "given up" }
                    ));
                    }
                    if bad > 0 {
                        self.report.note(format!(
                            "kernel inside ({group}, {}): {bad} replica files with wrong contents",
                            c.name()
                        ));
                    }
                    let wall = w.wall.as_secs_f64();
                    let events = summary.field("backend_events");
                    let records = summary.backend.as_ref().and(summary.field("records"));
                    eprintln!(
                        "kernel inside: run {}: {group}: {}: {} files in {}, complete {}, events {:?}, records {:?}, daemon CPU {}, rsync CPU {}, writer CPU {}",
                        rep + 1,
                        c.name(),
                        thousands(w.created),
                        dur(w.wall),
                        complete.map_or_else(|| "never".to_owned(), dur),
                        events,
                        records,
                        dur(own),
                        dur(rsync),
                        dur(w.cpu)
                    );
                    sec.push(group, c, 0, complete.map(|d| d.as_secs_f64()));
                    sec.push(group, c, 1, Some(wall));
                    sec.push(group, c, 2, events.map(|e| e / wall));
                    if c == Comp::Ebpf {
                        sec.push(group, c, 3, records.map(|e| e / wall));
                    }
                    sec.push(group, c, 4, Some(per(own.as_secs_f64(), w.created)));
                    sec.push(group, c, 5, Some(per(rsync.as_secs_f64(), w.created)));
                    sec.push(group, c, 6, summary.field("rsync_runs"));
                    sec.push(group, c, 7, Some(per(w.cpu.as_secs_f64(), w.created)));
                    sec.push(group, c, 8, summary.field("overflows"));
                    check_summary(
                        self,
                        &format!("kernel inside ({group}, {})", c.name()),
                        c,
                        &summary,
                    );
                }
            }
        }
        self.report.sections.push(sec);
        tree::remove(&tree.root)?;
        for (_, dst) in &replicas {
            tree::remove(dst)?;
        }
        Ok(())
    }

    // -------------------------------------------------------- busy filesystem, small root

    fn kernel_busy(&mut self, base: &Path, other_fs: &Path) -> Result<()> {
        let src = base.join("src");
        let dst = base.join("dst");
        tree::write_files(std::slice::from_ref(&src), SMALL_ROOT_FILES, &|_, f| {
            format!("small root {f}\n")
        })?;
        scen::seed(&src, &dst)?;
        let root = Tree {
            root: src.clone(),
            tops: 0,
        };
        let ndirs = self.sizes.kernel_files.div_ceil(PER_DIR);
        let total = ndirs * PER_DIR;
        let scaled = if total == PER as usize {
            String::new()
        } else {
            format!(
                " Fewer files than 100,000 at this scale: the figures per 100,000 creates are scaled (x{:.1}).",
                PER / total as f64
            )
        };
        let mut sec = Section::new(
            "kernel: busy filesystem, small root",
            vec![
                format!(
                    "The daemon watches a small root ({SMALL_ROOT_FILES} files); 2 threads of the harness create {} small files ({} directories of {PER_DIR}; each directory's files are unlinked and the directory removed right after it is full) outside it: in a sibling directory on the same filesystem, then on another filesystem (a tmpfs the harness mounts); the same writes are made once in each place before the first run, unmeasured. Half-way through, one new file is written into the root: `root change in replica` is the time until the replica has it (given up after {}). At the end the replica is compared with `rsync -anic --delete` (differences are listed in the notes).{scaled}",
                    thousands(total),
                    thousands(ndirs),
                    dur(CHANGE_TIMEOUT)
                ),
                "Delivered to user space: the events the fanotify backend read, the records the ebpf probes put in the ring buffer (per 100,000 creates; counted from start to stop of the daemon, so a few hundred are not from these writes: the root change and its replication, the final comparison, and for ebpf every other process of the machine). Dropped in the kernel: the `outside_roots_dropped_in_kernel` count of the ebpf backend (absent from daemons without the in-kernel filter). Daemon CPU: its own process, from the first create until its CPU time stopped growing after the writes. Writer CPU: the harness's writer threads (`getrusage(RUSAGE_THREAD)`), which pay for the probes and fanotify's queueing in the kernel. `watcher (ebpf, kernel filter off)` runs with `--ebpf-kernel-filter off`: every change goes to user space, which drops what is outside the root.".to_owned(),
            ],
            &[
                ("writing (creates + deletes)", Unit::Secs, true),
                ("writer CPU per 100,000", Unit::Secs, true),
                ("daemon CPU per 100,000", Unit::Secs, true),
                ("delivered to user space per 100,000", Unit::Count, true),
                ("dropped in the kernel per 100,000", Unit::Count, false),
                ("root change in replica", Unit::Secs, false),
                ("overflows", Unit::Count, false),
                ("rescans", Unit::Count, false),
                ("rsync runs", Unit::Count, false),
            ],
        )
        .with_ratios(&RATIOS, RATIO_NOTE);
        let mut comps = self.kernel_comps();
        if comps.contains(&Comp::Ebpf) {
            comps.push(Comp::EbpfUnfiltered);
        }
        let places = [
            ("same filesystem, outside the root", base.join("outside")),
            ("another filesystem (tmpfs)", other_fs.join("outside")),
        ];
        eprintln!("kernel busy: warm-up writes");
        for (_, area) in &places {
            write(
                &dirs_under(area, ndirs),
                true,
                &|_, _| String::new(),
                |_| Ok(()),
            )?;
            tree::remove(area)?;
        }
        let mut failed: Vec<(usize, Comp)> = Vec::new();
        let mut change_no = 0usize;
        for rep in 0..self.repeat {
            for (g, (group, area)) in places.iter().enumerate() {
                let dirs = dirs_under(area, ndirs);
                for &c in &comps {
                    if failed.contains(&(g, c)) {
                        continue;
                    }
                    proc::check_interrupted()?;
                    tree::remove(area)?;
                    nix::unistd::sync();
                    change_no += 1;
                    let change = src.join(format!("change-{change_no:03}"));
                    let change_dst = dst.join(format!("change-{change_no:03}"));
                    let text = format!("change {change_no} {} {group}\n", c.key());
                    let running = if c == Comp::Baseline {
                        None
                    } else {
                        match self.start("kernel (busy filesystem)", c, &root, &dst) {
                            Ok(r) => Some(r),
                            Err(e) => {
                                proc::check_interrupted()?;
                                self.report
                                    .note(format!("kernel busy ({group}, {}): {e:#}", c.name()));
                                failed.push((g, c));
                                continue;
                            }
                        }
                    };
                    let before = running.as_ref().map(|r| (r.cpu(), r.own_cpu()));
                    let watching = running.is_some();
                    let content = |d: usize, f: usize| format!("busy {d} {f}\n");
                    let (w, latency) = write(&dirs, true, &content, |p| {
                        // Half-way through the writes (bounded by the writers' end).
                        let end = Instant::now() + Duration::from_secs(600);
                        while p.created.load(Ordering::Relaxed) < total / 2
                            && !p.done()
                            && Instant::now() < end
                        {
                            proc::check_interrupted()?;
                            thread::sleep(Duration::from_millis(1));
                        }
                        let t0 = Instant::now();
                        fs::write(&change, &text)
                            .with_context(|| format!("writing {}", change.display()))?;
                        if !watching {
                            return Ok(None);
                        }
                        while t0.elapsed() < CHANGE_TIMEOUT {
                            if fs::read(&change_dst).is_ok_and(|b| b == text.as_bytes()) {
                                return Ok(Some(t0.elapsed()));
                            }
                            proc::check_interrupted()?;
                            thread::sleep(Duration::from_millis(1));
                        }
                        Ok(None)
                    })?;
                    let mut daemon_cpu = None;
                    let mut summary = Summary::default();
                    if let (Some(r), Some((total0, own0))) = (running, before) {
                        if !drain(&r)? {
                            self.report.note(format!(
                                "kernel busy ({group}, {}): the daemon was still busy {} after the writes",
                                c.name(),
                                dur(DRAIN_TIMEOUT)
                            ));
                        }
                        daemon_cpu = Some(cpu_split(&r, total0, own0).0);
                        let (converged, diff, content_diff) =
                            scen::converge(&src, &dst, VERIFY_TIMEOUT)?;
                        if converged.is_none() {
                            self.report.note(format!(
                                "kernel busy ({group}, {}): the replica still differed from the root {} after the writes ({diff} paths, {content_diff} in content)",
                                c.name(),
                                dur(VERIFY_TIMEOUT)
                            ));
                        }
                        summary = r.stop_summary()?;
                        check_summary(
                            self,
                            &format!("kernel busy ({group}, {})", c.name()),
                            c,
                            &summary,
                        );
                        if latency.is_none() {
                            self.report.note(format!(
                                "kernel busy ({group}, {}): the change in the root was not in the replica within {}",
                                c.name(),
                                dur(CHANGE_TIMEOUT)
                            ));
                        }
                    } else {
                        // Nothing replicates it: take it out of the root again.
                        fs::remove_file(&change)
                            .with_context(|| format!("removing {}", change.display()))?;
                    }
                    let delivered = match c {
                        Comp::Fanotify => summary.field("backend_events"),
                        Comp::Ebpf | Comp::EbpfUnfiltered => {
                            summary.backend.as_ref().and(summary.field("records"))
                        }
                        _ => None,
                    };
                    let dropped = summary
                        .backend
                        .as_deref()
                        .and_then(|l| crate::comp::field(l, "outside_roots_dropped_in_kernel"));
                    eprintln!(
                        "kernel busy: run {}: {group}: {}: {} creates in {}, writer CPU {}, daemon CPU {}, delivered {:?}, dropped in kernel {:?}, change after {}",
                        rep + 1,
                        c.name(),
                        thousands(w.created),
                        dur(w.wall),
                        dur(w.cpu),
                        daemon_cpu.map_or_else(|| "-".to_owned(), dur),
                        delivered,
                        dropped,
                        latency.map_or_else(|| "-".to_owned(), dur)
                    );
                    sec.push(group, c, 0, secs(w.wall));
                    sec.push(group, c, 1, Some(per(w.cpu.as_secs_f64(), w.created)));
                    if c != Comp::Baseline {
                        let n = w.created;
                        sec.push(group, c, 2, daemon_cpu.map(|d| per(d.as_secs_f64(), n)));
                        sec.push(group, c, 3, delivered.map(|v| per(v, n)));
                        if let Some(v) = dropped {
                            sec.push(group, c, 4, Some(per(v, n)));
                        }
                        sec.push(group, c, 5, latency.map(|d| d.as_secs_f64()));
                        sec.push(group, c, 6, summary.field("overflows"));
                        sec.push(group, c, 7, summary.field("rescans"));
                        sec.push(group, c, 8, summary.field("rsync_runs"));
                    }
                }
                tree::remove(area)?;
            }
        }
        self.report.sections.push(sec);
        tree::remove(&src)?;
        tree::remove(&dst)
    }
}

/// Notes a daemon that left no `stopped` line (killed, or crashed), or an ebpf daemon
/// without its backend line.
fn check_summary(ctx: &mut Ctx, what: &str, c: Comp, s: &Summary) {
    if s.daemon.is_none() {
        ctx.report.note(format!(
            "{what}: no `stopped` line from the daemon after SIGTERM",
        ));
    }
    let rescans = s
        .daemon
        .as_deref()
        .and_then(|l| crate::comp::field(l, "rescans"));
    if let Some(n) = rescans.filter(|n| *n > 0.0) {
        let unresolved = s
            .backend
            .as_deref()
            .and_then(|l| crate::comp::field(l, "unresolved"))
            .filter(|u| *u > 0.0)
            .map_or_else(String::new, |u| {
                format!(" ({u} paths the ebpf backend could not resolve)")
            });
        ctx.report
            .note(format!("{what}: {n} rescans of the root{unresolved}",));
    }
    if let Some(probes) = s.backend.as_deref().and_then(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("probes="))
            .map(|p| p.trim_matches('"').to_owned())
    }) {
        let note = format!(
            "kernel: the ebpf backend ran with its `{probes}` probe set (`--ebpf-probes auto`; the `ebpf backend stopped` line)"
        );
        if !ctx.report.notes.contains(&note) {
            ctx.report.note(note);
        }
    }
    if matches!(c, Comp::Ebpf | Comp::EbpfUnfiltered) && s.backend.is_none() {
        ctx.report
            .note(format!("{what}: no `ebpf backend stopped` line",));
    }
}
