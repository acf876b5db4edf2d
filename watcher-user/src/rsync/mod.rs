//! Turning a dirty batch into rsync runs and classifying how they ended; running one is
//! `exec`, probing the installed rsync `probe`.
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

mod exec;
mod probe;
mod progress;
mod standby;

pub use exec::{
    ITEMIZED_KEPT, RunResult, STALL_AFTER, Spawned, TransferStats, drive, execute, spawn,
};
pub use probe::{ProbeError, probe, recent_enough, version_in};
pub use progress::Progress;
pub use standby::{Standby, lone_change_args};

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
    /// Which runs remove from the replica what the source no longer has.
    pub delete: DeleteMode,
}

/// A group's `delete` setting, as lsyncd's: when rsync deletes on the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeleteMode {
    /// Always (`true`, the default).
    #[default]
    Always,
    /// Never (`false`): the replica keeps whatever the source removed.
    Never,
    /// Only in whole-tree passes (`"startup"`): the initial sync, and also a rescan after
    /// lost events and a verify pass, which are whole-tree passes too.
    Startup,
    /// Only for the changes seen while running (`"running"`): whole-tree passes delete
    /// nothing.
    Running,
}

impl DeleteMode {
    fn whole_tree(self) -> bool {
        matches!(self, DeleteMode::Always | DeleteMode::Startup)
    }

    fn listed(self) -> bool {
        matches!(self, DeleteMode::Always | DeleteMode::Running)
    }
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
            delete: DeleteMode::Always,
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
/// - Folded paths (marked on their own, covered by a subtree) go in one non-recursive
///   `--checksum` run after the subtrees, with their directories: a rewrite that kept size
///   and mtime, which the subtree run's quick check skipped, is compared by content and
///   sent; a file the subtree run just sent costs a read on each side, no transfer. With
///   `compare_subtrees` (too many folded paths to list) the subtree run itself compares
///   by content.
/// - Entries (files, symlinks, missing paths, directories' own attributes) go in one
///   non-recursive run, last, so directory mtimes end up final: a chmod of a
///   huge directory does not walk it, `--delete-missing-args --force` removes what no longer
///   exists (non-empty directories too), and `--ignore-times` sends a listed file even if a
///   rewrite kept its size and mtime (it changed: the kernel said so). Every name of a
///   multi-link file is listed here together (see [`crate::link_walk`]), so `-H` keeps
///   them linked.
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
    let compare = |args: &mut Vec<OsString>| {
        if batch.compare_subtrees {
            args.push("--checksum".into());
        }
    };
    let mut runs = Vec::new();
    let mut known = hashbrown::HashMap::new();
    let mut entries: std::collections::BTreeSet<&[u8]> = std::collections::BTreeSet::new();
    let mut collapsed: Vec<PathBuf> = Vec::new();
    let mut subtrees: Vec<&Path> = Vec::new();
    if batch.covers_root() {
        let mut args = common_args(opts);
        if opts.delete.whole_tree() {
            args.extend(["--delete".into(), "--force".into()]);
        }
        compare(&mut args);
        tail(&mut args);
        runs.push(Run {
            args,
            stdin: Vec::new(),
            paths: 0,
        });
    }
    let subtree_list = if batch.covers_root() {
        &[][..]
    } else {
        &batch.subtrees[..]
    };
    for (path, subtree) in subtree_list
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
    // Folded files with their directories, whose mtimes a file sent again would change.
    let mut folded: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    for path in &batch.folded {
        if first_non_dir_ancestor(path, root, &is_dir, &mut known).is_some() {
            continue;
        }
        folded.insert(path.clone());
        // Not the root unless a folded file lies in it: listed, the root brings every
        // top-level entry into the run.
        let mut dir = path.parent();
        while let Some(d) = dir {
            let top = d.as_os_str().is_empty();
            if (top && path.parent() != Some(d)) || !folded.insert(d.to_path_buf()) {
                break;
            }
            dir = d.parent();
        }
    }
    let list_args = |recursive: bool, skip: &str| {
        let mut args = common_args(opts);
        if recursive {
            args.push("-r".into());
            if opts.delete.listed() {
                args.push("--delete".into());
            }
            compare(&mut args);
        } else {
            args.extend(["--no-recursive".into(), "--dirs".into(), skip.into()]);
        }
        if opts.delete.listed() {
            args.extend(["--delete-missing-args".into(), "--force".into()]);
        } else {
            // A listed path that is gone is skipped, not an error (exit 23).
            args.push("--ignore-missing-args".into());
        }
        args.extend(["--from0".into(), "--files-from=-".into()]);
        args
    };
    if !subtrees.is_empty() {
        let (stdin, paths) = nul_list(subtrees.into_iter());
        let mut args = list_args(true, "");
        tail(&mut args);
        runs.push(Run { args, stdin, paths });
    }
    if !folded.is_empty() {
        let (stdin, paths) = nul_list(folded.iter().map(PathBuf::as_path));
        let mut args = list_args(false, "--checksum");
        tail(&mut args);
        runs.push(Run { args, stdin, paths });
    }
    // The root itself can only be listed as ".", and rsync's --dirs copies the contents of a
    // directory named "." (not only its attributes): with --ignore-times that would rewrite
    // every file at the top of the tree whenever a name there comes or goes. Its own
    // attributes get a run of their own instead (a whole-tree run sets them already): every
    // top-level name hidden from the sender and protected on the receiver, so not even a
    // --delete among the user's rsync_args could touch the replica's contents.
    let root_entry = entries.remove(&b""[..]);
    if !entries.is_empty() {
        let (stdin, paths) = nul_list(entries.into_iter().map(|b| Path::new(OsStr::from_bytes(b))));
        let mut args = list_args(false, "--ignore-times");
        tail(&mut args);
        runs.push(Run { args, stdin, paths });
    }
    if root_entry && !batch.covers_root() {
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

/// A run of one `source` (a file, or a directory's contents with a trailing slash) into
/// `dest`, outside the batch's lists: the target's own options and excludes, then `extra`.
/// Nothing is deleted.
pub fn single_run(
    opts: &RsyncOptions,
    extra: &[OsString],
    source: OsString,
    dest: OsString,
) -> Run {
    let mut args = common_args(opts);
    args.extend(extra.iter().cloned());
    args.extend(opts.extra_args.iter().cloned());
    args.push(source);
    args.push(dest);
    Run {
        args,
        stdin: Vec::new(),
        paths: 1,
    }
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
    use super::exec::{StdoutSink, kill_run, parse_stats_number, run_activity, stalled};
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
            ..Batch::default()
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
            ..Batch::default()
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
    fn delete_modes_choose_the_runs_that_delete() {
        let deletes = |delete: DeleteMode, batch: &Batch| {
            let opts = RsyncOptions { delete, ..opts() };
            let runs = plan(
                batch,
                Path::new("/s"),
                &Target::Local("/d".into()),
                &opts,
                |_| true,
            );
            runs.iter()
                .map(|r| {
                    let a = args(r);
                    let deleting = a.contains(&"--delete") || a.contains(&"--delete-missing-args");
                    let ignoring = a.contains(&"--ignore-missing-args");
                    assert!(!(deleting && ignoring), "{a:?}");
                    deleting
                })
                .collect::<Vec<bool>>()
        };
        let whole = Batch {
            entries: vec!["".into()],
            subtrees: vec!["".into()],
            ..Batch::default()
        };
        let changes = Batch {
            entries: vec!["f".into()],
            subtrees: vec!["t".into()],
            ..Batch::default()
        };
        assert!(whole.covers_root());
        let table = [
            (DeleteMode::Always, [true], [true, true]),
            (DeleteMode::Never, [false], [false, false]),
            (DeleteMode::Startup, [true], [false, false]),
            (DeleteMode::Running, [false], [true, true]),
        ];
        for (mode, on_whole, on_changes) in table {
            assert_eq!(deletes(mode, &whole), on_whole, "{mode:?} whole tree");
            assert_eq!(deletes(mode, &changes), on_changes, "{mode:?} changes");
        }
    }

    #[test]
    fn subtrees_run_recursively_before_the_entries() {
        let batch = Batch {
            entries: vec!["d".into(), "f".into(), "".into()],
            subtrees: vec!["t".into()],
            ..Batch::default()
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
            ..Batch::default()
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
    fn folded_files_are_compared_by_content_after_their_subtree() {
        let batch = Batch {
            entries: vec!["e".into()],
            subtrees: vec!["t".into()],
            folded: vec!["t/a/f".into(), "t/g".into()],
            compare_subtrees: false,
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
        assert!(!args(&runs[0]).contains(&"--checksum"));
        // With their directories, whose mtimes a file sent again changes.
        assert_eq!(runs[1].stdin, b"./t\0./t/a\0./t/a/f\0./t/g\0");
        let a = args(&runs[1]);
        assert!(a.contains(&"--checksum") && a.contains(&"--no-recursive"));
        assert!(!a.contains(&"--ignore-times"));
        assert_eq!(runs[2].stdin, b"./e\0");
        assert!(args(&runs[2]).contains(&"--ignore-times"));

        // After a whole-tree run too; too many to list: the subtree run compares contents.
        let batch = Batch {
            entries: vec![],
            subtrees: vec!["".into()],
            folded: vec!["x/f".into(), "top".into()],
            compare_subtrees: true,
        };
        let runs = plan(
            &batch,
            Path::new("/s"),
            &Target::Local("/d".into()),
            &opts(),
            |_| true,
        );
        assert_eq!(runs.len(), 2);
        assert!(runs[0].stdin.is_empty() && args(&runs[0]).contains(&"--checksum"));
        assert_eq!(runs[1].stdin, b".\0./top\0./x\0./x/f\0");
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
            ..Batch::default()
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
    fn a_run_asleep_without_cpu_is_taken_for_stuck_and_killed() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A shell that waits on a sleeping child: a tree of processes, all asleep.
            let mut child = tokio::process::Command::new("sh")
                .args(["-c", "sleep 30; true"])
                .spawn()
                .unwrap();
            let pid = child.id().map(|p| p as i32);
            let (cpu, asleep) = run_activity(pid.unwrap()).unwrap();
            assert!(cpu < 100 && (asleep || cpu == 0));
            let started = Instant::now();
            stalled(pid, Some(Duration::from_secs(2))).await;
            assert!(started.elapsed() < Duration::from_secs(10));
            kill_run(pid.unwrap());
            let status = child.wait().await.unwrap();
            assert_eq!(status.code(), None, "killed by a signal");
        });
        // Not watched: never reports.
        let never = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_millis(50), stalled(Some(1), None)).await
            });
        assert!(never.is_err());
    }

    #[test]
    fn stdout_is_split_into_progress_and_itemized_lines() {
        let mut sink = StdoutSink {
            progress: None,
            keep: true,
            kept: Vec::new(),
            itemized: 0,
            itemized_lines: Vec::new(),
            transfer: TransferStats::default(),
            partial: Vec::new(),
        };
        sink.feed(b"        32,768  50%   31.25MB/s    0:00:00 (xfr#1, to-chk=1/3)\r");
        sink.feed(b">f+++++++++ a file\n*deleting   gone\n.d..t...... dir/\ncd+++++++++ new/\n");
        sink.feed(b"        65,536 100%   31.25MB/s    0:00:00 (xfr#2, to-chk=0/3)\n");
        sink.feed(b"\nsent 1 bytes  received 2 bytes\n");
        assert_eq!(sink.itemized, 4);
        assert_eq!(
            sink.itemized_lines,
            [
                ">f+++++++++ a file",
                "*deleting   gone",
                ".d..t...... dir/",
                "cd+++++++++ new/"
            ]
        );
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
            itemized_lines: Vec::new(),
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
