//! Running one rsync process: its list on stdin, its output read as it comes (progress,
//! itemized paths, the `--stats` summary), a stop on request, a stuck run killed, and how it
//! ended.

use super::*;

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
    /// The first [`ITEMIZED_KEPT`] of those lines, for the log.
    pub itemized_lines: Vec<String>,
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
pub(super) const STATS_KEYS: [&str; 10] = [
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
pub(super) fn parse_stats_number(text: &str) -> Option<u64> {
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

/// How long every process of a local `-H` run may sleep without using CPU before the run
/// is taken for stuck and killed (see [`execute`]).
pub const STALL_AFTER: Duration = Duration::from_secs(20);

/// Keep at most this much of rsync's stderr and stdout.
pub(super) const OUTPUT_TAIL: usize = 64 * 1024;

/// A progress2 update: bytes, a percentage, a rate and an ETA, ended by a carriage return.
pub(super) fn is_progress(segment: &str) -> bool {
    segment.contains('%') && segment.contains("/s") && segment.starts_with(' ')
}

/// Itemized lines kept per run for the log: a verify pass names what it repaired.
pub const ITEMIZED_KEPT: usize = 100;

/// `--itemize-changes` lines start with an update type and a file type (`>f`, `cd`, `*deleting`).
pub(super) fn is_itemized(line: &str) -> bool {
    let b = line.as_bytes();
    line.starts_with("*deleting")
        || (b.len() > 12 && b"<>ch.*".contains(&b[0]) && b"fdLDS".contains(&b[1]) && b[11] == b' ')
}

/// Splits stdout into progress updates (ended by '\r') and lines (ended by '\n').
pub(super) struct StdoutSink {
    pub(super) progress: Option<Progress>,
    pub(super) keep: bool,
    pub(super) kept: Vec<u8>,
    pub(super) itemized: u64,
    pub(super) itemized_lines: Vec<String>,
    pub(super) transfer: TransferStats,
    pub(super) partial: Vec<u8>,
}

impl StdoutSink {
    pub(super) fn feed(&mut self, chunk: &[u8]) {
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
                        if self.itemized_lines.len() < ITEMIZED_KEPT {
                            self.itemized_lines.push(text.to_string());
                        }
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

/// The processes of one rsync run (`pid` and its descendants, from /proc): their CPU time
/// in clock ticks, and whether every one of them is asleep.
pub(super) fn run_activity(pid: i32) -> Option<(u64, bool)> {
    let mut procs: Vec<(i32, i32, bool, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ... utime stime" (fields 14 and 15); comm may hold spaces.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid), Some(utime), Some(stime)) = (
            f.first(),
            f.get(1).and_then(|v| v.parse::<i32>().ok()),
            f.get(11).and_then(|v| v.parse::<u64>().ok()),
            f.get(12).and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        procs.push((p, ppid, *state == "S", utime + stime));
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    let mine: Vec<_> = procs.iter().filter(|p| tree.contains(&p.0)).collect();
    if mine.is_empty() {
        return None;
    }
    Some((mine.iter().map(|p| p.3).sum(), mine.iter().all(|p| p.2)))
}

/// Waits until the processes of a local run have all been asleep without using any CPU
/// for `after`: stuck, since a local rsync only waits on itself (or on the disk, which is
/// not sleeping in this sense). Never returns for `None`.
pub(super) async fn stalled(pid: Option<i32>, after: Option<Duration>) {
    let (Some(pid), Some(after)) = (pid, after) else {
        return std::future::pending().await;
    };
    let mut last: Option<u64> = None;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match run_activity(pid) {
            Some((cpu, true)) if last == Some(cpu) && since.elapsed() >= after => return,
            Some((cpu, true)) if last == Some(cpu) => {}
            Some((cpu, _)) => {
                last = Some(cpu);
                since = Instant::now();
            }
            None => {}
        }
    }
}

/// Kills `pid` and its descendants.
pub(super) fn kill_run(pid: i32) {
    let mut tree = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        let stats: Vec<(i32, i32)> = dir
            .flatten()
            .filter_map(|e| {
                let p = e.file_name().to_str()?.parse::<i32>().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let rest = &stat[stat.rfind(')')? + 1..];
                let ppid = rest.split_whitespace().nth(1)?.parse::<i32>().ok()?;
                Some((p, ppid))
            })
            .collect();
        let mut i = 0;
        while i < tree.len() {
            let parent = tree[i];
            tree.extend(stats.iter().filter(|s| s.1 == parent).map(|s| s.0));
            i += 1;
        }
    }
    for p in tree {
        // SAFETY: kill(2) on processes this run started.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
}

/// Spawns rsync for `run`, feeding the list on stdin. Its pid is in `own_pids` while it runs
/// so the backend ignores its writes. With `stall_after` (local targets), a run whose
/// processes all sleep without using CPU for that long is killed: rsync 3.5.0 with `-H`
/// was seen waiting on itself for good when the source changed under it (every process
/// in a read; `--timeout` does not fire, the keepalives keep it alive).
pub async fn execute(
    binary: &Path,
    run: &Run,
    own_pids: &Arc<OwnPids>,
    keep_stdout: bool,
    progress: Option<Progress>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    stall_after: Option<Duration>,
) -> std::io::Result<RunResult> {
    let spawned = spawn(binary, &run.args, !run.stdin.is_empty(), own_pids)?;
    drive(
        spawned,
        run,
        own_pids,
        keep_stdout,
        progress,
        stop,
        stall_after,
    )
    .await
}

/// An rsync process started, its list not given yet. Dropped before [`drive`] took it, it
/// is killed and its pid leaves the daemon's own processes.
#[derive(Debug)]
pub struct Spawned {
    child: Option<tokio::process::Child>,
    pid: Option<i32>,
    own_pids: Arc<OwnPids>,
}

impl Spawned {
    /// Whether it still runs (a standby whose connection dropped has exited).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.try_wait();
            if let Some(pid) = self.pid {
                self.own_pids.remove(pid);
            }
        }
    }
}

/// Starts rsync with `args`, its stdin a pipe when `list` (else empty), its pid in
/// `own_pids` from now on.
pub fn spawn(
    binary: &Path,
    args: &[OsString],
    list: bool,
    own_pids: &Arc<OwnPids>,
) -> std::io::Result<Spawned> {
    let child = tokio::process::Command::new(binary)
        .args(args)
        .stdin(if list { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().map(|p| p as i32);
    if let Some(pid) = pid {
        own_pids.insert(pid);
    }
    Ok(Spawned {
        child: Some(child),
        pid,
        own_pids: own_pids.clone(),
    })
}

/// Gives the started rsync `run`'s list and follows it to its exit (see [`execute`]); its
/// time counts from here.
pub async fn drive(
    spawned: Spawned,
    run: &Run,
    own_pids: &Arc<OwnPids>,
    keep_stdout: bool,
    progress: Option<Progress>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    stall_after: Option<Duration>,
) -> std::io::Result<RunResult> {
    let started = Instant::now();
    let mut spawned = spawned;
    let pid = spawned.pid;
    let Some(mut child) = spawned.child.take() else {
        return Err(std::io::Error::other("rsync was already given its list"));
    };
    drop(spawned);
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
        itemized_lines: Vec::new(),
        transfer: TransferStats::default(),
        partial: Vec::new(),
    };
    // Scoped, so the borrow of `sink` ends with it.
    let (mut err, stuck) = {
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
        tokio::pin!(output);
        tokio::select! {
            (_, err) = &mut output => (err, false),
            // Asked to stop: SIGTERM lets rsync remove its temporary file and end its other
            // processes (SIGKILL would leave both); its output then ends as it exits.
            () = stop_requested(stop) => {
                use nix::sys::signal::{Signal, kill};
                let pid = pid.map(nix::unistd::Pid::from_raw);
                if let Some(pid) = pid {
                    let _ = kill(pid, Signal::SIGTERM);
                }
                let (_, err) = match tokio::time::timeout(STOP_GRACE, &mut output).await {
                    Ok(out) => out,
                    Err(_) => {
                        if let Some(pid) = pid {
                            let _ = kill(pid, Signal::SIGKILL);
                        }
                        output.await
                    }
                };
                (err, false)
            }
            _ = stalled(pid, stall_after) => {
                if let Some(pid) = pid {
                    kill_run(pid);
                }
                (output.await.1, true)
            }
        }
    };
    if stuck {
        err.extend_from_slice(
            format!(
                "\nrsync made no progress for {} s, every process asleep: killed",
                stall_after.unwrap_or_default().as_secs()
            )
            .as_bytes(),
        );
    }
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
        itemized_lines: sink.itemized_lines,
        transfer: sink.transfer,
        elapsed: started.elapsed(),
    })
}

/// How long a stopped rsync may take to clean up after SIGTERM before it gets SIGKILL.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(10);

/// Resolves once `stop` turns true; never without one, or once its sender is gone.
pub(super) async fn stop_requested(stop: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut stop) = stop
        && stop.wait_for(|s| *s).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}
