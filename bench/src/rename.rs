//! The `rename` scenario: a directory of 2,000 files (200 MiB) renamed, then a 50 MiB
//! file renamed, with the replica on a local directory, on an rsync daemon module and
//! over ssh. What every competitor makes the replica write is read from the block device
//! the replica has to itself (a loop-mounted ext4 image), so it is measured the same way
//! whatever the tool and the target; and the time until the replica is in step again.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::comp::{self, Comp, Dest};
use crate::image::LoopImage;
use crate::proc;
use crate::report::{self, dur, thousands};
use crate::rsyncd::Rsyncd;
use crate::scen::{self, Ctx};
use crate::sshd::{self, Sshd};
use crate::tree;

/// Files of the renamed directory, in [`DIR_SUBDIRS`] subdirectories.
const DIR_FILES: usize = 2_000;
const DIR_SUBDIRS: usize = 20;
/// Bytes of the renamed directory, spread evenly over its files.
const DIR_BYTES: u64 = 200 << 20;
/// Bytes of the renamed file.
const FILE_BYTES: u64 = 50 << 20;
/// Directories of the source tree, its root included (the inotify watches a script or
/// lsyncd must hold to be ready).
const TREE_DIRS: usize = 2 + DIR_SUBDIRS;
/// The image holding the replica: the tree twice (a copying tool has the old and the new
/// names at once) and room to spare.
const IMAGE_SIZE: &str = "2G";
/// Longest wait for the replica to be in step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Given up earlier, once the competitor ran no rsync for this long and the replica is
/// still not in step: nothing more will come.
const IDLE_GIVE_UP: Duration = Duration::from_secs(10);
/// Period of the in-step check.
const POLL: Duration = Duration::from_millis(20);
/// The goals for the directory: share of the renamed bytes written, time.
const GOAL_SHARE: f64 = 0.02;
const GOAL_TIME: Duration = Duration::from_secs(2);

/// What is renamed: what the table calls it, the name before and after, its bytes.
const CASES: [(&str, &str, &str, u64); 2] = [
    ("directory", "dir-a", "dir-b", DIR_BYTES),
    ("file", "file-a.bin", "file-b.bin", FILE_BYTES),
];

/// Where the replica is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Local,
    Daemon,
    Ssh,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Local, Kind::Daemon, Kind::Ssh];

    fn name(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Daemon => "rsync daemon",
            Kind::Ssh => "ssh",
        }
    }
}

/// Whether a competitor can write to a kind of target: lsyncd's `default.rsyncssh` only
/// over ssh; the others hand any rsync destination to rsync.
fn applies(c: Comp, k: Kind) -> bool {
    c != Comp::LsyncdSsh || k == Kind::Ssh
}

/// One rename, measured.
#[derive(Clone, Copy, Debug)]
struct Meas {
    /// Bytes the replica's block device wrote, from just before the rename until the
    /// competitor was in step (or given up) and idle, after `sync`.
    written: u64,
    /// From the rename until the replica was in step; None: not in step.
    in_step: Option<Duration>,
}

/// The runs of one competitor on one kind of target: per case, one entry per run (None:
/// the run failed before the rename).
struct Row {
    kind: Kind,
    comp: Comp,
    /// Why there is no figure at all (`n/a`).
    na: Option<String>,
    runs: [Vec<Option<Meas>>; 2],
}

/// What the replica must hold under `name` for the source's item of that name: every
/// file with the source's size and modification time, then the same contents; every
/// directory with as many entries (a leftover temporary file is a difference); and
/// nothing under `gone`.
struct Expect {
    name: String,
    gone: String,
    /// Relative to the item (empty: the item itself): size and mtime in seconds.
    files: Vec<(PathBuf, u64, i64)>,
    /// Relative to the item: entries.
    dirs: Vec<(PathBuf, usize)>,
}

fn at(base: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        base.to_owned()
    } else {
        base.join(rel)
    }
}

fn mtime_secs(m: &fs::Metadata) -> i64 {
    match m.modified().map(|t| t.duration_since(UNIX_EPOCH)) {
        Ok(Ok(d)) => d.as_secs() as i64,
        _ => -1,
    }
}

impl Expect {
    /// The source's item `name` (a file, or a directory two levels deep at most).
    fn of(src: &Path, name: &str, gone: &str) -> Result<Self> {
        let mut me = Self {
            name: name.to_owned(),
            gone: gone.to_owned(),
            files: Vec::new(),
            dirs: Vec::new(),
        };
        let mut todo = vec![PathBuf::new()];
        // Bounded: the item has DIR_FILES files in 1 + DIR_SUBDIRS directories.
        for _ in 0..4 * DIR_FILES {
            let Some(rel) = todo.pop() else {
                return Ok(me);
            };
            let path = at(&src.join(name), &rel);
            let m = fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if m.is_dir() {
                let mut n = 0;
                for e in fs::read_dir(&path)? {
                    todo.push(rel.join(e?.file_name()));
                    n += 1;
                }
                me.dirs.push((rel, n));
            } else {
                me.files.push((rel, m.len(), mtime_secs(&m)));
            }
        }
        bail!("{} has too many entries", src.join(name).display())
    }

    /// The same item under the other name.
    fn swapped(&self) -> Self {
        Self {
            name: self.gone.clone(),
            gone: self.name.clone(),
            files: self.files.clone(),
            dirs: self.dirs.clone(),
        }
    }

    /// Sizes, modification times, entry counts and the old name: what can be checked
    /// without reading the files.
    fn quick(&self, dst: &Path) -> bool {
        if fs::symlink_metadata(dst.join(&self.gone)).is_ok() {
            return false;
        }
        let item = dst.join(&self.name);
        self.dirs
            .iter()
            .all(|(rel, n)| fs::read_dir(at(&item, rel)).is_ok_and(|d| d.count() == *n))
            && self.files.iter().all(|(rel, size, mtime)| {
                fs::symlink_metadata(at(&item, rel))
                    .is_ok_and(|m| m.is_file() && m.len() == *size && mtime_secs(&m) == *mtime)
            })
    }

    /// Whether every file of the replica has the source's contents.
    fn same_contents(&self, src: &Path, dst: &Path) -> Result<bool> {
        let (a, b) = (src.join(&self.name), dst.join(&self.name));
        let mut x = vec![0u8; 1 << 20];
        let mut y = vec![0u8; 1 << 20];
        for (rel, _, _) in &self.files {
            proc::check_interrupted()?;
            let mut fa = fs::File::open(at(&a, rel))?;
            let Ok(mut fb) = fs::File::open(at(&b, rel)) else {
                return Ok(false);
            };
            loop {
                let n = read_full(&mut fa, &mut x)?;
                let m = read_full(&mut fb, &mut y)?;
                if n != m || x[..n] != y[..m] {
                    return Ok(false);
                }
                if n == 0 {
                    break;
                }
            }
        }
        Ok(true)
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Polls until the replica holds `e` (see [`Expect`]), from `start`: when. None after
/// [`STEP_TIMEOUT`], or once no rsync ran under `pid` for [`IDLE_GIVE_UP`].
fn wait_in_step(
    e: &Expect,
    src: &Path,
    dst: &Path,
    pid: i32,
    start: Instant,
) -> Result<Option<Duration>> {
    let mut last_busy = start;
    let mut activity = proc::RsyncActivity::new(pid);
    // Bounded by STEP_TIMEOUT (at least POLL per round).
    for _ in 0..=STEP_TIMEOUT.as_millis() / POLL.as_millis() {
        proc::check_interrupted()?;
        if e.quick(dst) {
            // In step once the quick check passed; the contents confirm it.
            let at = start.elapsed();
            if e.same_contents(src, dst)? {
                return Ok(Some(at));
            }
        }
        let now = Instant::now();
        if activity.busy() {
            last_busy = now;
        }
        if now - start >= STEP_TIMEOUT
            || (now - start >= IDLE_GIVE_UP && now - last_busy >= IDLE_GIVE_UP)
        {
            break;
        }
        std::thread::sleep(POLL);
    }
    Ok(None)
}

/// Writes the source: `dir-a` (2,000 files of incompressible data in 20 subdirectories)
/// and `file-a.bin`.
fn generate(src: &Path) -> Result<()> {
    let per_file = (DIR_BYTES / DIR_FILES as u64) as usize;
    let per_dir = DIR_FILES / DIR_SUBDIRS;
    let mut buf = vec![0u8; per_file];
    for d in 0..DIR_SUBDIRS {
        proc::check_interrupted()?;
        let dir = src.join(CASES[0].1).join(format!("s{d:02}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in 0..per_dir {
            StdRng::seed_from_u64((d * per_dir + f) as u64).fill_bytes(&mut buf);
            fs::write(dir.join(tree::file_name(f)), &buf)?;
        }
    }
    let mut big = vec![0u8; FILE_BYTES as usize];
    StdRng::seed_from_u64(u64::MAX).fill_bytes(&mut big);
    fs::write(src.join(CASES[1].1), &big)?;
    Ok(())
}

/// Puts the old names back in the source and, cheaply when it is in step, in the
/// replica, then makes the replica a copy of the source (`rsync -a --delete`).
fn reset(src: &Path, dst: &Path) -> Result<()> {
    for (_, old, new, _) in CASES {
        if src.join(new).exists() {
            fs::rename(src.join(new), src.join(old))?;
        }
        if dst.join(new).exists() && !dst.join(old).exists() {
            fs::rename(dst.join(new), dst.join(old))?;
        }
    }
    scen::seed(src, dst)
}

/// `1.2 MiB`, `340 KiB`.
fn bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}

fn pct(share: f64) -> String {
    let p = share * 100.0;
    if p >= 10.0 {
        format!("{p:.0}%")
    } else if p >= 0.1 {
        format!("{p:.1}%")
    } else {
        format!("{p:.3}%")
    }
}

/// `median [min–max]` of values shown by `show`.
fn spread(v: &[f64], show: impl Fn(f64) -> String) -> String {
    let vals: Vec<Option<f64>> = v.iter().map(|x| Some(*x)).collect();
    let Some(m) = report::median(&vals) else {
        return String::new();
    };
    if v.len() > 1 {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{} [{}–{}]", show(m), show(lo), show(hi))
    } else {
        show(m)
    }
}

/// The three cells of one case: written, share of the renamed bytes, in step after.
fn cells(runs: &[Option<Meas>], renamed: u64) -> [String; 3] {
    let ok: Vec<Meas> = runs.iter().flatten().copied().collect();
    let failed = runs.len() - ok.len();
    if ok.is_empty() {
        return ["failed".into(), String::new(), String::new()];
    }
    let written: Vec<f64> = ok.iter().map(|m| m.written as f64).collect();
    let mut w = spread(&written, |b| bytes(b as u64));
    if failed > 0 {
        w.push_str(&format!(" ({failed} of {} runs failed)", runs.len()));
    }
    let share = spread(&written, |b| pct(b / renamed as f64));
    let times: Vec<f64> = ok
        .iter()
        .filter_map(|m| m.in_step.map(|d| d.as_secs_f64()))
        .collect();
    let not = ok.len() - times.len();
    let t = if times.is_empty() {
        "not in step".to_owned()
    } else if not > 0 {
        format!(
            "{} ({not} of {} runs not in step)",
            spread(&times, |s| dur(Duration::from_secs_f64(s))),
            ok.len()
        )
    } else {
        spread(&times, |s| dur(Duration::from_secs_f64(s)))
    };
    [w, share, t]
}

impl Ctx {
    pub fn rename(&mut self) -> Result<()> {
        let base = self.workdir.join("rename");
        let r = self.rename_in(&base);
        let removed = tree::remove(&base);
        r?;
        removed
    }

    /// The competitors: the live ones chosen, lsyncd's rsyncssh mode after lsyncd.
    fn rename_comps(&self) -> Vec<Comp> {
        let mut v = Vec::new();
        for &c in &self.comps {
            if c.is_live() {
                v.push(c);
            }
            if c == Comp::Lsyncd {
                v.push(Comp::LsyncdSsh);
            }
        }
        v
    }

    fn rename_in(&mut self, base: &Path) -> Result<()> {
        fs::create_dir_all(base)?;
        let src = base.join("src");
        eprintln!(
            "rename: writing the source ({} and {})",
            bytes(DIR_BYTES),
            bytes(FILE_BYTES)
        );
        generate(&src)?;
        let image = LoopImage::create_with(
            base,
            "-replica",
            IMAGE_SIZE,
            &["-E", "lazy_itable_init=0,lazy_journal_init=0"],
            "loop,noatime",
        )?;
        let dst = image.mount.join("dst");
        scen::seed(&src, &dst)?;
        // Fails early when the write counter cannot be read.
        image.written()?;
        let mut notes = Vec::new();
        let daemon = match Rsyncd::start(&base.join("rsyncd"), &dst) {
            Ok(d) => Some(d),
            Err(e) => {
                proc::check_interrupted()?;
                notes.push(format!("rsync daemon target: {e:#}"));
                None
            }
        };
        let server = if !Path::new(sshd::SSHD).is_file() {
            notes.push(format!(
                "ssh target: no {} (cargo xtask setup installs openssh-server)",
                sshd::SSHD
            ));
            None
        } else {
            match Sshd::start(&base.join("sshd")) {
                Ok(s) => Some(s),
                Err(e) => {
                    proc::check_interrupted()?;
                    notes.push(format!("ssh target: {e:#}"));
                    None
                }
            }
        };
        let mut rows: Vec<Row> = Vec::new();
        for kind in Kind::ALL {
            let dest = match kind {
                Kind::Local => Some(Dest::local(&dst)?),
                Kind::Daemon => daemon.as_ref().map(Rsyncd::dest),
                Kind::Ssh => server.as_ref().map(|s| s.dest(&dst)),
            };
            for c in self.rename_comps() {
                let na = if dest.is_none() {
                    Some("no server".to_owned())
                } else if !applies(c, kind) {
                    Some("ssh targets only".to_owned())
                } else {
                    None
                };
                rows.push(Row {
                    kind,
                    comp: c,
                    na,
                    runs: [Vec::new(), Vec::new()],
                });
            }
        }
        let expects: Vec<[Expect; 2]> = CASES
            .iter()
            .map(|(_, old, new, _)| {
                let before = Expect::of(&src, old, new)?;
                let after = before.swapped();
                Ok([before, after])
            })
            .collect::<Result<_>>()?;
        for rep in 0..self.repeat {
            for row in rows.iter_mut() {
                if row.na.is_some() {
                    continue;
                }
                // Given up: not in step in an earlier run.
                if row
                    .runs
                    .iter()
                    .flatten()
                    .flatten()
                    .any(|m| m.in_step.is_none())
                {
                    continue;
                }
                proc::check_interrupted()?;
                let dest = match row.kind {
                    Kind::Local => Dest::local(&dst)?,
                    Kind::Daemon => daemon.as_ref().map(Rsyncd::dest).context("no daemon")?,
                    Kind::Ssh => server.as_ref().map(|s| s.dest(&dst)).context("no sshd")?,
                };
                let what = format!("{} to {} target", row.comp.name(), row.kind.name());
                let lines = comp::command_lines_to(&self.env(), row.comp, &src, &dest)?;
                self.report.command(&format!("rename: {what}"), lines);
                match self.rename_run(row.comp, &dest, &src, &dst, &image, &expects) {
                    Ok(m) => {
                        for (i, (case, ..)) in CASES.iter().enumerate() {
                            eprintln!(
                                "rename: run {}: {what}: {case}: {} written, {}",
                                rep + 1,
                                bytes(m[i].written),
                                m[i].in_step.map_or_else(|| "not in step".to_owned(), dur)
                            );
                            row.runs[i].push(Some(m[i]));
                        }
                        if m.iter().any(|m| m.in_step.is_none()) && rep + 1 < self.repeat {
                            notes.push(format!(
                                "{what}: not in step in run {}, not repeated",
                                rep + 1
                            ));
                        }
                    }
                    Err(e) => {
                        proc::check_interrupted()?;
                        let msg = report::hide_workdir(&format!("{e:#}"), &self.workdir);
                        notes.push(format!("{what}, run {}: {msg}", rep + 1));
                        for r in row.runs.iter_mut() {
                            r.push(None);
                        }
                    }
                }
            }
        }
        if let Some(d) = daemon {
            d.stop()?;
        }
        if let Some(s) = server {
            s.stop()?;
        }
        drop(image);
        self.rename_table(&rows);
        for n in notes {
            self.report.note(format!("rename: {n}"));
        }
        Ok(())
    }

    /// One run: the competitor started on the seeded replica and in step, then the
    /// directory renamed and measured, then the file.
    fn rename_run(
        &mut self,
        c: Comp,
        dest: &Dest,
        src: &Path,
        dst: &Path,
        image: &LoopImage,
        expects: &[[Expect; 2]],
    ) -> Result<[Meas; 2]> {
        reset(src, dst)?;
        let r = comp::start_to(&self.env(), c, src, dest, TREE_DIRS)?;
        let t0 = Instant::now();
        for e in expects {
            if wait_in_step(&e[0], src, dst, r.pid(), t0)?.is_none() {
                bail!("the replica is not in step with the source before the renames");
            }
        }
        proc::wait_rsync_idle(r.pid(), Duration::from_millis(300), Duration::from_secs(30))?;
        let mut out = [Meas {
            written: 0,
            in_step: None,
        }; 2];
        for (i, (_, old, new, _)) in CASES.iter().enumerate() {
            nix::unistd::sync();
            let before = image.written()?;
            let start = Instant::now();
            fs::rename(src.join(old), src.join(new))
                .with_context(|| format!("renaming {old} to {new}"))?;
            let in_step = wait_in_step(&expects[i][1], src, dst, r.pid(), start)?;
            // What the competitor still writes once in step counts too.
            proc::wait_rsync_idle(r.pid(), Duration::from_millis(500), Duration::from_secs(30))?;
            nix::unistd::sync();
            out[i] = Meas {
                written: image.written()?.saturating_sub(before),
                in_step,
            };
        }
        r.stop()?;
        Ok(out)
    }

    fn rename_table(&mut self, rows: &[Row]) {
        let mut md = format!(
            "\n## rename: a renamed directory and a renamed file\n\n\
             A source tree holding a directory of {} files ({DIR_SUBDIRS} subdirectories, {} of incompressible data) and a {} file. The replica lives on an ext4 image of its own ({IMAGE_SIZE}, loop-mounted with `noatime`, `mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0` so that no background initialisation writes): what a competitor makes the replica write is the sectors written of the loop device (`/sys/block/loopN/stat`), read after `sync` just before the rename and again once it was in step and no rsync of it had run for 500 ms; journal and metadata included, the same count for every tool and target. Each competitor starts on a replica seeded with `rsync -a --delete` and checked in step; then the directory is renamed (one rename(2) in the source) and measured; then the file.\n\n\
             In step: the new names hold every file with the source's size and modification time and no other entry (polled every {}), then the same contents (compared byte for byte), and the old name is gone; time from the rename. Given up after {}, or earlier once the competitor ran no rsync for {} with the replica still not in step. Targets: the replica's directory (local); an rsync daemon the harness starts on 127.0.0.1 serving it as a module (`rsync://USER@127.0.0.1:PORT/{}`, `--password-file`); `root@127.0.0.1:DIR` through an OpenSSH server the harness starts on 127.0.0.1. The scripts and lsyncd's `default.rsync` pass the same rsync options (password file, `--rsh`) to rsync; lsyncd's `default.rsyncssh` replays moves with `mv` over ssh and applies to ssh targets only (n/a elsewhere). {} run(s); a competitor not in step is not run again on that target.\n\n",
            thousands(DIR_FILES),
            bytes(DIR_BYTES),
            bytes(FILE_BYTES),
            dur(POLL),
            dur(STEP_TIMEOUT),
            dur(IDLE_GIVE_UP),
            crate::rsyncd::MODULE,
            self.repeat,
        );
        md.push_str(&format!(
            "| target | competitor | directory: written on the replica | of {} | in step after | file: written on the replica | of {} | in step after |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
            bytes(DIR_BYTES),
            bytes(FILE_BYTES)
        ));
        let mut goals = Vec::new();
        for row in rows {
            let mut r = vec![row.kind.name().to_owned(), row.comp.name().to_owned()];
            if let Some(why) = &row.na {
                r.push(format!("n/a ({why})"));
                r.extend(std::iter::repeat_n("n/a".to_owned(), 5));
            } else {
                for (i, (.., renamed)) in CASES.iter().enumerate() {
                    r.extend(cells(&row.runs[i], *renamed));
                }
                if row.comp.is_watcher() {
                    let ok: Vec<&Meas> = row.runs[0].iter().flatten().collect();
                    let met = !ok.is_empty()
                        && ok.iter().all(|m| {
                            m.written as f64 <= GOAL_SHARE * DIR_BYTES as f64
                                && m.in_step.is_some_and(|d| d <= GOAL_TIME)
                        });
                    goals.push(format!(
                        "{} to {}: {}",
                        row.comp.name(),
                        row.kind.name(),
                        if met { "met" } else { "not met" }
                    ));
                }
            }
            let r: Vec<String> = r
                .into_iter()
                .map(|c| {
                    if c.is_empty() {
                        "-".into()
                    } else {
                        c.replace('|', "\\|")
                    }
                })
                .collect();
            md.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        if !goals.is_empty() {
            md.push_str(&format!(
                "\nGoals for the directory (at most {} of the renamed bytes written and in step within {}, in every run): {}.\n",
                pct(GOAL_SHARE),
                dur(GOAL_TIME),
                goals.join("; ")
            ));
        }
        self.report.extra.push(md);
    }
}
