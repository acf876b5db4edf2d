//! Turning a dirty batch into rsync runs, running them, and classifying how they ended.
//!
//! rsync is always spawned with an argument vector, the path list on stdin, NUL-separated.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::OwnPids;
use crate::dirty::Batch;
use crate::target::Target;

/// How rsync is invoked, shared by every run of one target.
#[derive(Debug, Clone)]
pub struct RsyncOptions {
    pub binary: PathBuf,
    /// Preserve hard links (`-H`): exact, but costs memory on large trees.
    pub hardlinks: bool,
    /// Stay on the source root's filesystem (`-x`), as capture does with `one_file_system`.
    pub one_file_system: bool,
    /// rsync exclude patterns (the filter applies the same ones to events).
    pub excludes: Vec<String>,
    /// Passed through before the source and target arguments.
    pub extra_args: Vec<OsString>,
    /// `--dry-run --itemize-changes`: show what would change, change nothing.
    pub dry_run: bool,
}

impl Default for RsyncOptions {
    fn default() -> Self {
        RsyncOptions {
            binary: PathBuf::from(crate::config::defaults::RSYNC),
            hardlinks: false,
            one_file_system: false,
            excludes: Vec::new(),
            extra_args: Vec::new(),
            dry_run: false,
        }
    }
}

/// One rsync process to start: its arguments and what goes to its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub args: Vec<OsString>,
    pub stdin: Vec<u8>,
    /// Paths in the list (0 for a whole-tree run).
    pub paths: usize,
}

/// How a run ended, from rsync's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 0, or 24 (a source file vanished: normal under churn, its removal is its own event).
    Success,
    /// Worth retrying with backoff, keeping the paths dirty (connection, I/O, timeout,
    /// partial transfer, killed by a signal).
    Transient,
    /// Usage, protocol or unsupported-option errors: retrying cannot help.
    Fatal,
    /// rsync aborted because a listed path's directory vanished or was replaced while it
    /// built its file list (code 2, "invalid path from sender", rsync 3.4+): a race with
    /// the source, never a real protocol problem.
    SourceRace,
}

/// Classifies an rsync exit code (None: killed by a signal).
pub fn classify(code: Option<i32>) -> ExitClass {
    match code {
        Some(0) | Some(24) => ExitClass::Success,
        Some(1) | Some(2) | Some(4) => ExitClass::Fatal,
        _ => ExitClass::Transient,
    }
}

/// What the receiver prints when a listed path's parent is missing from the file list it
/// got: the sender lost that directory to a concurrent rename or removal.
const SOURCE_RACE_MESSAGE: &str = "invalid path from sender";

/// Classifies a finished run from its exit code and what it printed.
pub fn classify_run(code: Option<i32>, stderr: &str) -> ExitClass {
    if code == Some(2) && stderr.contains(SOURCE_RACE_MESSAGE) {
        return ExitClass::SourceRace;
    }
    classify(code)
}

/// What rsync's exit code means, for logs.
pub fn describe(code: Option<i32>) -> &'static str {
    match code {
        None => "killed by a signal",
        Some(0) => "success",
        Some(1) => "syntax or usage error",
        Some(2) => "protocol incompatibility",
        Some(3) => "errors selecting input/output files, dirs",
        Some(4) => "requested action not supported",
        Some(5) => "error starting client-server protocol",
        Some(10) => "error in socket I/O",
        Some(11) => "error in file I/O",
        Some(12) => "error in rsync protocol data stream",
        Some(20) => "received SIGUSR1 or SIGINT",
        Some(23) => "partial transfer due to error",
        Some(24) => "partial transfer due to vanished source files",
        Some(30) => "timeout in data send/receive",
        Some(35) => "timeout waiting for daemon connection",
        Some(255) => "connection or remote shell failed",
        _ => "rsync error",
    }
}

/// The source directory argument: the root's contents, not the root itself.
fn source_arg(root: &Path) -> OsString {
    let mut arg = root.as_os_str().to_owned();
    if !arg.as_bytes().ends_with(b"/") {
        arg.push("/");
    }
    arg
}

fn common_args(opts: &RsyncOptions) -> Vec<OsString> {
    // Compare mtimes to the nanosecond (rsync 3.1.3+): by default rsync compares whole
    // seconds and skips a file rewritten at the same size within the same second.
    let mut args: Vec<OsString> = vec!["-a".into(), "--modify-window=-1".into()];
    if opts.hardlinks {
        args.push("-H".into());
    }
    if opts.one_file_system {
        args.push("-x".into());
    }
    if opts.dry_run {
        args.push("--dry-run".into());
        args.push("--itemize-changes".into());
    }
    for pattern in &opts.excludes {
        let mut arg = OsString::from("--exclude=");
        arg.push(pattern);
        args.push(arg);
    }
    args
}

fn nul_list<'a>(paths: impl Iterator<Item = &'a Path>) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut n = 0;
    for p in paths {
        let bytes = p.as_os_str().as_bytes();
        if bytes.is_empty() {
            // The root itself; an empty line would be skipped.
            out.push(b'.');
        } else {
            // rsync reads names starting with '#' or ';' in a files-from list as comments,
            // even with --from0; "./" keeps them names without changing what is implied.
            out.extend_from_slice(b"./");
            out.extend_from_slice(bytes);
        }
        out.push(0);
        n += 1;
    }
    (out, n)
}

/// Where a dirty path's ancestors stopped being directories, if they did: a directory that
/// was replaced by a file or a symlink, or removed. Listing a path below it would make
/// rsync fail ("Not a directory") or follow a symlink into a real directory on the target;
/// listing the ancestor itself syncs (or deletes) exactly what changed.
fn first_non_dir_ancestor(
    rel: &Path,
    root: &Path,
    is_dir: &impl Fn(&Path) -> bool,
    known: &mut hashbrown::HashMap<PathBuf, bool>,
) -> Option<PathBuf> {
    let mut ancestor = PathBuf::new();
    let mut components = rel.components().peekable();
    while let Some(component) = components.next() {
        if components.peek().is_none() {
            break;
        }
        ancestor.push(component);
        let dir = match known.get(&ancestor) {
            Some(d) => *d,
            None => {
                let d = is_dir(&root.join(&ancestor));
                known.insert(ancestor.clone(), d);
                d
            }
        };
        if !dir {
            return Some(ancestor);
        }
    }
    None
}

/// The rsync runs that bring `target` in line with `root` for the paths in `batch`.
///
/// - A batch covering the root is one whole-tree `rsync -a --delete`.
/// - Subtrees go in one recursive `--files-from` run (`--delete` removes what a listed
///   subtree no longer holds).
/// - Entries (files, symlinks, missing paths, directories' own attributes) go in one
///   non-recursive run, after the subtrees so directory mtimes end up final: a chmod of a
///   huge directory does not walk it, `--delete-missing-args --force` removes what no longer
///   exists (non-empty directories too), and `--ignore-times` sends a listed file even if a
///   rewrite kept its size and mtime (it changed: the kernel said so).
///
/// `is_dir` tells which paths are directories now (the source is read at flush time).
pub fn plan(
    batch: &Batch,
    root: &Path,
    target: &Target,
    opts: &RsyncOptions,
    is_dir: impl Fn(&Path) -> bool,
) -> Vec<Run> {
    let tail = |args: &mut Vec<OsString>| {
        args.extend(opts.extra_args.iter().cloned());
        args.push(source_arg(root));
        args.push(target.rsync_arg());
    };
    if batch.covers_root() {
        let mut args = common_args(opts);
        args.extend(["--delete".into(), "--force".into()]);
        tail(&mut args);
        return vec![Run {
            args,
            stdin: Vec::new(),
            paths: 0,
        }];
    }
    let mut known = hashbrown::HashMap::new();
    let mut entries: std::collections::BTreeSet<&[u8]> = std::collections::BTreeSet::new();
    let mut collapsed: Vec<PathBuf> = Vec::new();
    let mut subtrees: Vec<&Path> = Vec::new();
    for (path, subtree) in batch
        .subtrees
        .iter()
        .map(|p| (p, true))
        .chain(batch.entries.iter().map(|p| (p, false)))
    {
        match first_non_dir_ancestor(path, root, &is_dir, &mut known) {
            Some(ancestor) => collapsed.push(ancestor),
            None if subtree => subtrees.push(path),
            None => {
                entries.insert(path.as_os_str().as_bytes());
            }
        }
    }
    for ancestor in &collapsed {
        entries.insert(ancestor.as_os_str().as_bytes());
    }
    let list_args = |recursive: bool| {
        let mut args = common_args(opts);
        if recursive {
            args.extend(["-r".into(), "--delete".into()]);
        } else {
            args.extend([
                "--no-recursive".into(),
                "--dirs".into(),
                "--ignore-times".into(),
            ]);
        }
        args.extend([
            "--delete-missing-args".into(),
            "--force".into(),
            "--from0".into(),
            "--files-from=-".into(),
        ]);
        args
    };
    let mut runs = Vec::new();
    if !subtrees.is_empty() {
        let (stdin, paths) = nul_list(subtrees.into_iter());
        let mut args = list_args(true);
        tail(&mut args);
        runs.push(Run { args, stdin, paths });
    }
    // The root itself can only be listed as ".", and rsync's --dirs copies the contents of a
    // directory named "." (not only its attributes): with --ignore-times that would rewrite
    // every file at the top of the tree whenever a name there comes or goes. Its own
    // attributes get a run of their own instead: every top-level name hidden from the
    // sender and protected on the receiver, so not even a --delete among the user's
    // rsync_args could touch the replica's contents.
    let root_entry = entries.remove(&b""[..]);
    if !entries.is_empty() {
        let (stdin, paths) = nul_list(entries.into_iter().map(|b| Path::new(OsStr::from_bytes(b))));
        let mut args = list_args(false);
        tail(&mut args);
        runs.push(Run { args, stdin, paths });
    }
    if root_entry {
        let mut args = common_args(opts);
        args.extend([
            "--no-recursive".into(),
            "--dirs".into(),
            "--filter=H /*".into(),
            "--filter=P /*".into(),
        ]);
        tail(&mut args);
        runs.push(Run {
            args,
            stdin: Vec::new(),
            paths: 1,
        });
    }
    runs
}

/// Asks the runs of a batch for what the engine reads back from them: the paths rsync
/// changed (`--itemize-changes`, a verify pass counts its repairs so; a dry run already
/// itemizes), overall progress on stdout (`--info=progress2`, rsync 3.1+) for a
/// whole-tree run, which can take hours, and the bytes moved (`--stats`, for the metrics).
pub fn report(runs: &mut [Run], itemize: bool, progress: bool, opts: &RsyncOptions) {
    for run in runs {
        run.args.insert(1, "--stats".into());
        if itemize && !opts.dry_run {
            run.args.insert(1, "--itemize-changes".into());
        }
        if progress {
            run.args.insert(1, "--info=progress2".into());
        }
    }
}

/// How one process ended.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub code: Option<i32>,
    pub class: ExitClass,
    /// The last part of rsync's stderr, for the log.
    pub stderr: String,
    /// Standard output without progress lines (only kept when asked for).
    pub stdout: String,
    /// Lines of `--itemize-changes` output: paths rsync changed (or would change).
    pub itemized: u64,
    /// What `--stats` said (zero when the run was not asked for it, or died first).
    pub transfer: TransferStats,
    pub elapsed: Duration,
}

/// The bytes a run moved, from rsync's `--stats` summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// "Total bytes sent": everything rsync wrote to the connection (file data, checksums,
    /// the file list). For a local target, what the sender wrote to the receiver.
    pub sent: u64,
    /// "Total bytes received": what came back.
    pub received: u64,
    /// "Literal data": file contents sent as they are, that is without the parts the
    /// delta algorithm found on the target already.
    pub literal: u64,
}

impl TransferStats {
    /// Adds another run's figures.
    pub fn add(&mut self, other: TransferStats) {
        self.sent += other.sent;
        self.received += other.received;
        self.literal += other.literal;
    }

    /// Takes one line of rsync's stdout into account; returns whether it belongs to the
    /// `--stats` summary. A later figure replaces an earlier one: the summary comes last,
    /// after any file names `-v` may print (a file could be named like a summary line).
    fn feed_line(&mut self, line: &str) -> bool {
        let Some((key, value)) = line.split_once(": ") else {
            return false;
        };
        let slot = match key {
            "Total bytes sent" => &mut self.sent,
            "Total bytes received" => &mut self.received,
            "Literal data" => &mut self.literal,
            _ => return STATS_KEYS.contains(&key),
        };
        if let Some(n) = value.split_whitespace().next().and_then(parse_stats_number) {
            *slot = n;
        }
        true
    }
}

/// The other lines of the `--stats` summary (rsync 3.1 to 3.4), kept out of the output the
/// daemon logs.
const STATS_KEYS: [&str; 10] = [
    "Number of files",
    "Number of created files",
    "Number of deleted files",
    "Number of regular files transferred",
    "Total file size",
    "Total transferred file size",
    "Matched data",
    "File list size",
    "File list generation time",
    "File list transfer time",
];

/// A figure of rsync's `--stats`: `187`, `2,500,003` (digit groups, `.` in locales whose
/// decimal mark is `,`), or with `-h` `2.50M` / `2,50M` (two decimals and a unit of 1000;
/// `-hh` units of 1024 are read as 1000, so such figures come out 2 to 13% low).
fn parse_stats_number(text: &str) -> Option<u64> {
    let (digits, scale) = match text.chars().last()? {
        'K' => (&text[..text.len() - 1], 1e3),
        'M' => (&text[..text.len() - 1], 1e6),
        'G' => (&text[..text.len() - 1], 1e9),
        'T' => (&text[..text.len() - 1], 1e12),
        'P' => (&text[..text.len() - 1], 1e15),
        _ => (text, 1.0),
    };
    if digits.is_empty()
        || !digits.starts_with(|c: char| c.is_ascii_digit())
        || !digits
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '.')
    {
        return None;
    }
    if scale == 1.0 {
        // A whole number: anything but digits is a group separator.
        return digits
            .chars()
            .filter(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok();
    }
    // Scaled: the mark before the last two digits is the decimal one.
    let (whole, fraction) = match digits.len().checked_sub(3) {
        Some(at) if matches!(digits.as_bytes()[at], b'.' | b',') => {
            (&digits[..at], &digits[at + 1..])
        }
        _ => (digits, ""),
    };
    let whole: String = whole.chars().filter(char::is_ascii_digit).collect();
    let number: f64 = format!("{whole}.{fraction}0").parse().ok()?;
    Some((number * scale).round() as u64)
}

/// Keep at most this much of rsync's stderr and stdout.
const OUTPUT_TAIL: usize = 64 * 1024;

/// Reports a long whole-tree run's progress (from `--info=progress2`): redrawn in place on a
/// terminal, logged every `every` otherwise.
pub struct Progress {
    label: &'static str,
    target: String,
    every: Duration,
    last: Option<Instant>,
    terminal: bool,
}

impl Progress {
    /// Progress of `label` ("full sync", "verify") towards `target`.
    pub fn new(label: &'static str, target: &Target, every: Duration) -> Self {
        use std::io::IsTerminal;
        Progress {
            label,
            target: target.to_string(),
            every,
            last: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// One progress2 line: "  1,234,567  45%  12.34MB/s  0:00:12 (xfr#12, to-chk=100/2000)".
    fn update(&mut self, line: &str) {
        let now = Instant::now();
        let period = if self.terminal {
            Duration::from_millis(200)
        } else {
            self.every
        };
        if self.last.is_some_and(|t| now.duration_since(t) < period) {
            return;
        }
        self.last = Some(now);
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if self.terminal {
            eprint!("\r\x1b[K{} {}: {line}", self.label, self.target);
        } else {
            tracing::info!(target = %self.target, "{} progress: {line}", self.label);
        }
    }

    fn finish(&self) {
        if self.terminal && self.last.is_some() {
            eprintln!();
        }
    }
}

/// A progress2 update: bytes, a percentage, a rate and an ETA, ended by a carriage return.
fn is_progress(segment: &str) -> bool {
    segment.contains('%') && segment.contains("/s") && segment.starts_with(' ')
}

/// `--itemize-changes` lines start with an update type and a file type (`>f`, `cd`, `*deleting`).
fn is_itemized(line: &str) -> bool {
    let b = line.as_bytes();
    line.starts_with("*deleting")
        || (b.len() > 12 && b"<>ch.*".contains(&b[0]) && b"fdLDS".contains(&b[1]) && b[11] == b' ')
}

/// Splits stdout into progress updates (ended by '\r') and lines (ended by '\n').
struct StdoutSink {
    progress: Option<Progress>,
    keep: bool,
    kept: Vec<u8>,
    itemized: u64,
    transfer: TransferStats,
    partial: Vec<u8>,
}

impl StdoutSink {
    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\r' || b == b'\n' {
                let segment = std::mem::take(&mut self.partial);
                let text = String::from_utf8_lossy(&segment);
                if is_progress(&text) {
                    if let Some(p) = self.progress.as_mut() {
                        p.update(&text);
                    }
                } else if !text.trim().is_empty() && !self.transfer.feed_line(&text) {
                    if is_itemized(&text) {
                        self.itemized += 1;
                    }
                    if self.keep && self.kept.len() < OUTPUT_TAIL {
                        self.kept.extend_from_slice(&segment);
                        self.kept.push(b'\n');
                    }
                }
            } else {
                self.partial.push(b);
            }
        }
    }
}

/// Spawns rsync for `run`, feeding the list on stdin. Its pid is in `own_pids` while it runs
/// so the backend ignores its writes.
pub async fn execute(
    binary: &Path,
    run: &Run,
    own_pids: &Arc<OwnPids>,
    keep_stdout: bool,
    progress: Option<Progress>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> std::io::Result<RunResult> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args(&run.args)
        .stdin(if run.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().map(|p| p as i32);
    if let Some(pid) = pid {
        own_pids.insert(pid);
    }
    let stdin_task = child.stdin.take().map(|mut stdin| {
        let list = run.stdin.clone();
        tokio::spawn(async move {
            // A broken pipe means rsync exited early; its exit status says why.
            let _ = stdin.write_all(&list).await;
            let _ = stdin.shutdown().await;
        })
    });
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut sink = StdoutSink {
        progress,
        keep: keep_stdout,
        kept: Vec::new(),
        itemized: 0,
        transfer: TransferStats::default(),
        partial: Vec::new(),
    };
    // Scoped, so the borrow of `sink` ends with it.
    let (_, err) = {
        let output = async {
            tokio::join!(
                async {
                    let mut buf = vec![0u8; 16 * 1024];
                    if let Some(s) = stdout.as_mut() {
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            sink.feed(&buf[..n]);
                        }
                    }
                    sink.feed(b"\n");
                },
                async {
                    let mut buf = Vec::new();
                    if let Some(s) = stderr.as_mut() {
                        let _ = s.read_to_end(&mut buf).await;
                    }
                    buf
                }
            )
        };
        // Asked to stop: SIGTERM lets rsync remove its temporary file and end its other
        // processes (SIGKILL would leave both); its output then ends as it exits.
        tokio::pin!(output);
        tokio::select! {
            out = &mut output => out,
            () = stop_requested(stop) => {
                use nix::sys::signal::{Signal, kill};
                let pid = pid.map(nix::unistd::Pid::from_raw);
                if let Some(pid) = pid {
                    let _ = kill(pid, Signal::SIGTERM);
                }
                match tokio::time::timeout(STOP_GRACE, &mut output).await {
                    Ok(out) => out,
                    Err(_) => {
                        if let Some(pid) = pid {
                            let _ = kill(pid, Signal::SIGKILL);
                        }
                        output.await
                    }
                }
            }
        }
    };
    if let Some(p) = &sink.progress {
        p.finish();
    }
    let status = child.wait().await;
    if let Some(task) = stdin_task {
        let _ = task.await;
    }
    if let Some(pid) = pid {
        own_pids.remove(pid);
    }
    let status = status?;
    let code = status.code();
    let err = &err[err.len().saturating_sub(OUTPUT_TAIL)..];
    let stderr = String::from_utf8_lossy(err).trim_end().to_owned();
    Ok(RunResult {
        code,
        class: classify_run(code, &stderr),
        stderr,
        stdout: String::from_utf8_lossy(&sink.kept).into_owned(),
        itemized: sink.itemized,
        transfer: sink.transfer,
        elapsed: started.elapsed(),
    })
}

/// How long a stopped rsync may take to clean up after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Resolves once `stop` turns true; never without one, or once its sender is gone.
async fn stop_requested(stop: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut stop) = stop
        && stop.wait_for(|s| *s).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// rsync is missing, too old, or does not behave as the daemon relies on.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run {binary}: {source} (install rsync 3.1.3 or later)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version printed no version")]
    NoVersion { binary: PathBuf },
    #[error(
        "{binary} is version {version}; 3.1.3 or later is needed (--delete-missing-args, nanosecond --modify-window)"
    )]
    TooOld { binary: PathBuf, version: String },
    #[error("{binary} {version} failed the --files-from/--delete-missing-args self-test: {detail}")]
    Misbehaves {
        binary: PathBuf,
        version: String,
        detail: String,
    },
}

/// Checks once at start-up that the installed rsync copies and deletes listed paths the way
/// [`plan`] relies on (some 3.4.x releases broke `--files-from` + `--delete-missing-args`).
/// Returns the version.
pub fn probe(binary: &Path) -> Result<String, ProbeError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| ProbeError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .ok_or_else(|| ProbeError::NoVersion {
            binary: binary.to_path_buf(),
        })?
        .to_owned();
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    if numbers.as_slice() < [3, 1, 3].as_slice() {
        return Err(ProbeError::TooOld {
            binary: binary.to_path_buf(),
            version,
        });
    }
    self_test(binary).map_err(|detail| ProbeError::Misbehaves {
        binary: binary.to_path_buf(),
        version: version.clone(),
        detail,
    })?;
    Ok(version)
}

fn self_test(binary: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let setup = || -> std::io::Result<()> {
        std::fs::create_dir_all(src.join("-d"))?;
        std::fs::write(src.join("-d/new\nline"), b"new")?;
        std::fs::create_dir_all(dst.join("gone/sub"))?;
        std::fs::write(dst.join("gone/sub/f"), b"old")?;
        std::fs::write(dst.join("stale"), b"old")?;
        Ok(())
    };
    setup().map_err(|e| format!("setting up: {e}"))?;
    let batch = Batch {
        entries: vec!["-d/new\nline".into(), "gone".into(), "stale".into()],
        subtrees: vec![],
    };
    let opts = RsyncOptions {
        binary: binary.to_path_buf(),
        ..RsyncOptions::default()
    };
    let runs = plan(&batch, &src, &Target::Local(dst.clone()), &opts, |p| {
        p.is_dir()
    });
    for run in runs {
        let mut child = std::process::Command::new(binary)
            .args(&run.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(&run.stdin).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let copied = std::fs::read(dst.join("-d/new\nline")).ok();
    if copied.as_deref() != Some(b"new".as_slice()) {
        return Err("a listed file was not copied".into());
    }
    if dst.join("stale").exists() || dst.join("gone").exists() {
        return Err("a listed missing path was not deleted".into());
    }
    Ok(())
}

/// Human-readable form of an argument vector for logs (never executed through a shell).
pub fn display_args(binary: &Path, args: &[OsString]) -> String {
    std::iter::once(binary.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a: &OsStr| format!("{:?}", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn opts() -> RsyncOptions {
        RsyncOptions {
            excludes: vec!["*.swp".into()],
            extra_args: vec!["--password-file=/p".into()],
            ..RsyncOptions::default()
        }
    }

    #[test]
    fn one_file_system_stays_on_the_root_filesystem() {
        let x = |one_file_system| {
            common_args(&RsyncOptions {
                one_file_system,
                ..opts()
            })
            .contains(&OsString::from("-x"))
        };
        assert!(x(true));
        assert!(!x(false));
    }

    #[test]
    fn exit_codes_are_classified() {
        let table = [
            (Some(0), ExitClass::Success),
            (Some(24), ExitClass::Success),
            (Some(1), ExitClass::Fatal),
            (Some(2), ExitClass::Fatal),
            (Some(4), ExitClass::Fatal),
            (Some(5), ExitClass::Transient),
            (Some(10), ExitClass::Transient),
            (Some(11), ExitClass::Transient),
            (Some(12), ExitClass::Transient),
            (Some(23), ExitClass::Transient),
            (Some(30), ExitClass::Transient),
            (Some(35), ExitClass::Transient),
            (Some(255), ExitClass::Transient),
            (None, ExitClass::Transient),
        ];
        for (code, class) in table {
            assert_eq!(classify(code), class, "{code:?}");
        }
    }

    #[test]
    fn a_lost_parent_directory_is_a_source_race_not_a_protocol_error() {
        // What rsync 3.4+ prints when a listed directory vanished while the sender read it.
        let raced = "file has vanished: \"/src/d14/d87\"\n\
                     ABORTING due to invalid path from sender: d14/d87/d88\n\
                     rsync error: protocol incompatibility (code 2) at generator.c(1715)";
        assert_eq!(classify_run(Some(2), raced), ExitClass::SourceRace);
        let real = "protocol version mismatch -- is your shell clean?\n\
                    rsync error: protocol incompatibility (code 2) at compat.c(622)";
        assert_eq!(classify_run(Some(2), real), ExitClass::Fatal);
        assert_eq!(classify_run(Some(23), raced), ExitClass::Transient);
        assert_eq!(classify_run(Some(24), ""), ExitClass::Success);
    }

    fn args(run: &Run) -> Vec<&str> {
        run.args.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn root_batch_is_one_whole_tree_run() {
        let batch = Batch {
            entries: vec![],
            subtrees: vec!["".into()],
        };
        let runs = plan(
            &batch,
            Path::new("/s"),
            &Target::Local("/d".into()),
            &opts(),
            |_| false,
        );
        assert_eq!(runs.len(), 1);
        assert_eq!(
            args(&runs[0]),
            [
                "-a",
                "--modify-window=-1",
                "--exclude=*.swp",
                "--delete",
                "--force",
                "--password-file=/p",
                "/s/",
                "/d/"
            ]
        );
        assert!(runs[0].stdin.is_empty());
    }

    #[test]
    fn entries_are_one_non_recursive_run_with_safe_names() {
        let batch = Batch {
            entries: vec![
                "#hash".into(),
                "a\nb".into(),
                "-x".into(),
                "".into(),
                ";semi".into(),
            ],
            subtrees: vec![],
        };
        let runs = plan(
            &batch,
            Path::new("/s"),
            &Target::Remote("h::m".into()),
            &opts(),
            |_| true,
        );
        // The root's own attributes come in a run of their own (see below).
        assert_eq!(runs.len(), 2);
        // Sorted by bytes; "./" keeps '#' and ';' from being read as comments.
        assert_eq!(runs[0].stdin, b"./#hash\0./-x\0./;semi\0./a\nb\0");
        assert_eq!(runs[0].paths, 4);
        let a = args(&runs[0]);
        for want in [
            "--no-recursive",
            "--dirs",
            "--ignore-times",
            "--delete-missing-args",
            "--force",
        ] {
            assert!(a.contains(&want), "{want} missing from {a:?}");
        }
        assert!(!a.contains(&"--delete") && !a.contains(&"-r"));
        assert_eq!(&a[a.len() - 2..], ["/s/", "h::m/"]);
    }

    #[test]
    fn subtrees_run_recursively_before_the_entries() {
        let batch = Batch {
            entries: vec!["d".into(), "f".into(), "".into()],
            subtrees: vec!["t".into()],
        };
        let runs = plan(
            &batch,
            Path::new("/s"),
            &Target::Local("/d".into()),
            &opts(),
            |_| true,
        );
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].stdin, b"./t\0");
        assert!(args(&runs[0]).contains(&"-r") && args(&runs[0]).contains(&"--delete"));
        assert!(!args(&runs[0]).contains(&"--ignore-times"));
        assert_eq!(runs[1].stdin, b"./d\0./f\0");
        assert!(args(&runs[1]).contains(&"--no-recursive"));
        // The root last, so its mtime ends up final.
        assert!(runs[2].stdin.is_empty());
    }

    /// The root listed as "." would make rsync --dirs copy its contents too (and with
    /// --ignore-times, rewrite them all); its own run carries only its attributes, whatever
    /// delete options the user added.
    #[test]
    fn the_root_entry_carries_only_its_attributes() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("s"), tmp.path().join("d"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("top"), "new content").unwrap();
        std::fs::write(dst.join("top"), "old content").unwrap();
        std::fs::write(dst.join("extra"), "not in the source").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
        let batch = Batch {
            entries: vec!["".into()],
            subtrees: vec![],
        };
        let mut options = opts();
        options.excludes.clear();
        options.extra_args = vec!["--delete".into(), "--delete-excluded".into()];
        let runs = plan(&batch, &src, &Target::Local(dst.clone()), &options, |_| {
            true
        });
        assert_eq!(runs.len(), 1);
        let status = std::process::Command::new("rsync")
            .args(&runs[0].args)
            .status()
            .expect("run rsync");
        assert!(status.success());
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750, "the root's attributes");
        assert_eq!(std::fs::read(dst.join("top")).unwrap(), b"old content");
        assert!(dst.join("extra").exists());
    }

    #[test]
    fn paths_below_a_replaced_directory_collapse_to_it() {
        // "x" was a directory and is now a file or a symlink; "gone" no longer exists.
        let batch = Batch {
            entries: vec![
                "gone/sub/f".into(),
                "ok/f".into(),
                "x/a".into(),
                "x/b/c".into(),
            ],
            subtrees: vec!["x/d".into(), "ok/new".into()],
        };
        let is_dir = |p: &Path| p == Path::new("/s/ok");
        let runs = plan(
            &batch,
            Path::new("/s"),
            &Target::Local("/d".into()),
            &opts(),
            is_dir,
        );
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].stdin, b"./ok/new\0");
        assert_eq!(runs[1].stdin, b"./gone\0./ok/f\0./x\0");
    }

    #[test]
    fn stdout_is_split_into_progress_and_itemized_lines() {
        let mut sink = StdoutSink {
            progress: None,
            keep: true,
            kept: Vec::new(),
            itemized: 0,
            transfer: TransferStats::default(),
            partial: Vec::new(),
        };
        sink.feed(b"        32,768  50%   31.25MB/s    0:00:00 (xfr#1, to-chk=1/3)\r");
        sink.feed(b">f+++++++++ a file\n*deleting   gone\n.d..t...... dir/\ncd+++++++++ new/\n");
        sink.feed(b"        65,536 100%   31.25MB/s    0:00:00 (xfr#2, to-chk=0/3)\n");
        sink.feed(b"\nsent 1 bytes  received 2 bytes\n");
        assert_eq!(sink.itemized, 4);
        let kept = String::from_utf8(sink.kept).unwrap();
        assert!(kept.contains(">f+++++++++ a file") && kept.contains("sent 1 bytes"));
        assert!(!kept.contains("xfr#"));
    }

    #[test]
    fn stats_figures_are_read_in_every_format() {
        for (text, want) in [
            ("0", Some(0)),
            ("187", Some(187)),
            ("2,500,776", Some(2_500_776)),
            // Locales whose decimal mark is a comma group digits with a point.
            ("2.500.776", Some(2_500_776)),
            // -h: two decimals and a unit.
            ("2.50M", Some(2_500_000)),
            ("2,50M", Some(2_500_000)),
            ("57", Some(57)),
            ("1.23K", Some(1_230)),
            ("999.99G", Some(999_990_000_000)),
            ("1,234.56T", Some(1_234_560_000_000_000)),
            ("1.234,56T", Some(1_234_560_000_000_000)),
            ("3K", Some(3_000)),
            ("", None),
            ("M", None),
            ("bytes", None),
            ("-1", None),
            ("1e5", None),
            ("12x", None),
        ] {
            assert_eq!(parse_stats_number(text), want, "{text:?}");
        }
    }

    #[test]
    fn stats_summary_is_read_and_not_kept() {
        let mut sink = StdoutSink {
            progress: None,
            keep: true,
            kept: Vec::new(),
            itemized: 0,
            transfer: TransferStats::default(),
            partial: Vec::new(),
        };
        // rsync 3.2 with --itemize-changes --stats; a file named like a summary line comes
        // before the summary itself.
        sink.feed(
            b">f+++++++++ Total bytes sent: 9\n\
              \n\
              Number of files: 3 (reg: 2, dir: 1)\n\
              Number of created files: 2 (reg: 2)\n\
              Number of deleted files: 0\n\
              Number of regular files transferred: 2\n\
              Total file size: 2,500,003 bytes\n\
              Total transferred file size: 2,500,003 bytes\n\
              Literal data: 2,500,003 bytes\n\
              Matched data: 0 bytes\n\
              File list size: 0\n\
              File list generation time: 0.001 seconds\n\
              File list transfer time: 0.000 seconds\n\
              Total bytes sent: 2,500,776\n\
              Total bytes received: 54\n\
              \n\
              sent 2,500,776 bytes  received 54 bytes  5,001,660.00 bytes/sec\n\
              total size is 2,500,003  speedup is 1.00\n",
        );
        assert_eq!(
            sink.transfer,
            TransferStats {
                sent: 2_500_776,
                received: 54,
                literal: 2_500_003,
            }
        );
        assert_eq!(sink.itemized, 1);
        let kept = String::from_utf8(sink.kept).unwrap();
        assert_eq!(
            kept,
            ">f+++++++++ Total bytes sent: 9\n\
             sent 2,500,776 bytes  received 54 bytes  5,001,660.00 bytes/sec\n\
             total size is 2,500,003  speedup is 1.00\n"
        );

        let mut total = TransferStats::default();
        total.add(sink.transfer);
        total.add(TransferStats {
            sent: 1,
            received: 2,
            literal: 3,
        });
        assert_eq!(
            total,
            TransferStats {
                sent: 2_500_777,
                received: 56,
                literal: 2_500_006,
            }
        );
    }
}
