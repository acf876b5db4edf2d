//! `post_sync`: a command of the target's configuration, run after each batch that landed on
//! it, with the paths that batch synced on its standard input (what lsyncd users do with
//! `onChange` hooks: reindex, notify, invalidate a cache).
//!
//! The command is an argument vector, run without a shell. Its standard input is a list of
//! paths relative to the source root, each ended by a NUL byte (names may hold newlines):
//! a path synced with everything below it ends with `/` (the root is `./`), the root's own
//! attributes are `.`. Its environment adds `WATCHER_GROUP`, `WATCHER_TARGET`,
//! `WATCHER_SOURCE` and `WATCHER_DEST`.
//!
//! One command runs at a time per target, never holding back the target's syncing: batches
//! that land while it runs are handed to the next run together. A run that fails (exit not
//! 0, killed, cannot start, longer than [`TIMEOUT`]) is logged with what it printed on
//! stderr and counted; the synced data is not affected.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::dirty::Batch;

/// Longest a run may take before it is killed.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// What a run's stderr may add to the log.
const STDERR_KEPT: usize = 2048;

/// Runs and failures of a target's command; they belong to the daemon's statistics, which
/// a reload keeps.
#[derive(Debug, Default)]
pub struct Counters {
    pub runs: AtomicU64,
    pub failures: AtomicU64,
}

/// The command of one target, with the task that runs it.
#[derive(Debug)]
pub struct Hook {
    tx: mpsc::UnboundedSender<(Vec<u8>, Arc<Counters>)>,
}

impl Hook {
    /// Starts the task running `command` (program first) for target `label`, with `env`
    /// added to the daemon's environment. Needs a tokio runtime.
    pub fn start(
        command: Vec<OsString>,
        env: Vec<(&'static str, OsString)>,
        label: String,
    ) -> Hook {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, Arc<Counters>)>();
        tokio::spawn(async move {
            while let Some((mut list, mut counters)) = rx.recv().await {
                // Batches that landed while the last run went are handed over together.
                while let Ok((more, c)) = rx.try_recv() {
                    list.extend_from_slice(&more);
                    counters = c;
                }
                counters.runs.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = run(&command, &env, &list).await {
                    counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target = %label, "post_sync command failed: {why}");
                }
            }
        });
        Hook { tx }
    }

    /// `batch` landed: the command runs with its paths.
    pub fn synced(&self, batch: &Batch, counters: &Arc<Counters>) {
        let list = path_list(batch);
        if !list.is_empty() {
            // The task ends only with the hook.
            let _ = self.tx.send((list, counters.clone()));
        }
    }
}

/// The NUL-ended paths of `batch` as the command reads them (see the module docs).
pub fn path_list(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in &batch.entries {
        let bytes = entry.as_os_str().as_bytes();
        out.extend_from_slice(if bytes.is_empty() { b"." } else { bytes });
        out.push(0);
    }
    for subtree in &batch.subtrees {
        let bytes = subtree.as_os_str().as_bytes();
        out.extend_from_slice(if bytes.is_empty() { b"." } else { bytes });
        out.extend_from_slice(b"/\0");
    }
    out
}

/// One run of the command with `list` on stdin; Err says why it failed.
async fn run(
    command: &[OsString],
    env: &[(&'static str, OsString)],
    list: &[u8],
) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("no command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let list = list.to_vec();
    // A command that does not read its input must not block the run: a closed pipe is fine.
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&list).await;
    });
    let read_err = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = (&mut stderr)
            .take(STDERR_KEPT as u64)
            .read_to_end(&mut text)
            .await;
        // The rest is drained so the command never blocks on a full pipe.
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        text
    });
    let status = match tokio::time::timeout(TIMEOUT, child.wait()).await {
        Ok(status) => status.map_err(|e| format!("waiting for it: {e}"))?,
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!(
                "still running after {}s; killed",
                TIMEOUT.as_secs()
            ));
        }
    };
    let _ = feed.await;
    let text = read_err.await.unwrap_or_default();
    let said = String::from_utf8_lossy(&text);
    let said = said.trim();
    if status.success() {
        if !said.is_empty() {
            tracing::debug!(stderr = %said, "post_sync command output");
        }
        return Ok(());
    }
    let how = match status.code() {
        Some(code) => format!("exit {code}"),
        None => "killed by a signal".to_string(),
    };
    Err(if said.is_empty() {
        how
    } else {
        format!("{how}: {said}")
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn paths_are_nul_ended_and_subtrees_end_with_a_slash() {
        let batch = Batch {
            entries: vec![PathBuf::new(), "a/f".into(), "odd\nname".into()],
            subtrees: vec!["d".into()],
            ..Batch::default()
        };
        assert_eq!(path_list(&batch), b".\0a/f\0odd\nname\0d/\0");
        let whole = Batch {
            subtrees: vec![PathBuf::new()],
            ..Batch::default()
        };
        assert_eq!(path_list(&whole), b"./\0");
        assert!(path_list(&Batch::default()).is_empty());
    }

    #[tokio::test]
    async fn a_run_gets_the_list_and_its_failures_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let script = format!("cat > '{}'; echo done >&2", out.display());
        let command: Vec<OsString> = ["/bin/sh", "-c", &script].map(OsString::from).to_vec();
        assert_eq!(run(&command, &[], b"a\0b/\0").await, Ok(()));
        assert_eq!(std::fs::read(&out).unwrap(), b"a\0b/\0");

        let failing: Vec<OsString> = ["/bin/sh", "-c", "echo 'index locked' >&2; exit 3"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(
            run(&failing, &[], b"a\0").await,
            Err("exit 3: index locked".to_string())
        );
        let missing = vec![OsString::from("/nonexistent/command")];
        let err = run(&missing, &[], b"").await.unwrap_err();
        assert!(
            err.starts_with("cannot run /nonexistent/command: "),
            "{err}"
        );
    }
}
