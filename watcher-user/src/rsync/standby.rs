//! An rsync started ahead of the next lone change, so that change does not wait for rsync
//! to start.
//!
//! rsync reads its `--files-from` list only after it has started its other side and agreed
//! on the protocol with it: for a local target the fork of its receiver, for an ssh target
//! the session over the master connection and the remote `rsync --server`, the larger part
//! of a lone change's time there. After each batch that landed, the runner starts one rsync
//! with the arguments a lone change's run will have (see [`lone_change_args`]) and leaves
//! it waiting for its list; the next run with exactly those arguments takes it and gives it
//! its list. Any other run starts rsync as usual, and a standby that is no longer alive
//! (its connection dropped) is discarded and not used.
//!
//! A standby is an idle rsync process per target (and, for an ssh target, a remote one),
//! outside `max_processes`; it is stopped on exit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::exec::{self, Spawned};
use super::{RsyncOptions, plan, report};
use crate::backend::OwnPids;
use crate::dirty::Batch;
use crate::target::Target;

/// At most one waiting rsync for one target.
#[derive(Debug, Default)]
pub struct Standby {
    waiting: Mutex<Option<(Vec<OsString>, Spawned)>>,
}

impl Standby {
    /// The waiting rsync, if it was started with exactly `args` and still runs. One started
    /// with other arguments stays for a later run.
    pub fn take(&self, args: &[OsString]) -> Option<Spawned> {
        let mut slot = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let (waiting_args, mut spawned) = slot.take()?;
        if waiting_args != args {
            *slot = Some((waiting_args, spawned));
            return None;
        }
        // One that exited is dropped (reaped, its pid forgotten).
        spawned.alive().then_some(spawned)
    }

    /// Starts an rsync with `args` to wait for its list, unless a live one with them
    /// waits already. A failure to start is only logged: runs start rsync themselves.
    pub fn prepare(&self, binary: &Path, args: Vec<OsString>, own_pids: &Arc<OwnPids>) {
        let mut slot = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((waiting_args, spawned)) = slot.as_mut()
            && *waiting_args == args
            && spawned.alive()
        {
            return;
        }
        // Dropping the one waiting stops it.
        *slot = None;
        match exec::spawn(binary, &args, true, own_pids) {
            Ok(spawned) => *slot = Some((args, spawned)),
            Err(e) => tracing::debug!(error = %e, "no rsync started ahead"),
        }
    }

    /// Stops the waiting rsync, if any.
    pub fn clear(&self) {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The arguments of the run a lone change to a file below the root gets: its batch's one
/// run, as [`plan`] and [`report`] make it.
pub fn lone_change_args(root: &Path, target: &Target, opts: &RsyncOptions) -> Vec<OsString> {
    let batch = Batch {
        entries: vec![PathBuf::from("d"), PathBuf::from("d/f")],
        ..Batch::default()
    };
    let mut runs = plan(&batch, root, target, opts, |_| true);
    report(&mut runs, false, false, opts);
    runs.into_iter().next().map(|r| r.args).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_change_plans_the_run_a_standby_is_started_for() {
        let root = Path::new("/src");
        let target = Target::Local(PathBuf::from("/dst"));
        let opts = RsyncOptions::default();
        let args = lone_change_args(root, &target, &opts);
        // A new file in a directory: its entry and its directory's, in one run.
        for batch in [
            Batch {
                entries: vec![PathBuf::from("a/b"), PathBuf::from("a/b/new file")],
                ..Batch::default()
            },
            Batch {
                entries: vec![PathBuf::from("x")],
                ..Batch::default()
            },
        ] {
            let mut runs = plan(&batch, root, &target, &opts, |p| {
                !p.ends_with("new file") && !p.ends_with("x")
            });
            report(&mut runs, false, false, &opts);
            assert_eq!(runs[0].args, args, "{batch:?}");
        }
        // Another run (a subtree) does not take it.
        let subtree = Batch {
            subtrees: vec![PathBuf::from("a")],
            ..Batch::default()
        };
        let mut runs = plan(&subtree, root, &target, &opts, |_| true);
        report(&mut runs, false, false, &opts);
        assert_ne!(runs[0].args, args);
    }

    #[tokio::test]
    async fn a_standby_is_taken_only_by_its_own_arguments_and_while_alive() {
        let own = Arc::new(OwnPids::new());
        let standby = Standby::default();
        let sleep = Path::new("sleep");
        standby.prepare(sleep, vec!["30".into()], &own);
        assert_eq!(
            own.snapshot().len(),
            2,
            "the standby is one of the daemon's own"
        );
        assert!(standby.take(&["31".into()]).is_none());
        let taken = standby.take(&["30".into()]).expect("waiting");
        drop(taken);
        assert_eq!(own.snapshot().len(), 1, "dropped: killed and forgotten");
        assert!(standby.take(&["30".into()]).is_none(), "taken once");
        // One that exited is not handed out.
        standby.prepare(Path::new("true"), vec![], &own);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(standby.take(&[]).is_none());
        standby.prepare(sleep, vec!["30".into()], &own);
        standby.clear();
        assert!(standby.take(&["30".into()]).is_none());
        assert_eq!(own.snapshot().len(), 1);
    }
}
