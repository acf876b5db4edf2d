//! Replaying renames on an rsync daemon, which has no rename command: before the batch,
//! one rsync run per renamed name sends the new name with the old one as its basis on the
//! receiver, so the data is linked or delta-copied there instead of sent again.
//!
//! - A directory: its contents into `new/` with `--link-dest` pointing at `old` (relative
//!   to `new`): every unchanged file becomes a hard link to the old one, nothing is sent
//!   but the file list. The batch's runs then delete `old`, leaving one name per file.
//! - A file that kept its name in another directory: the same, `--link-dest` at the old
//!   directory.
//! - A file renamed in its directory: `--fuzzy`, which takes the file of the same size and
//!   mtime in the destination directory as the basis of a delta transfer.
//!
//! A file that changed both directory and name is left to rsync (it copies): `--fuzzy`
//! does look in `--link-dest` directories when given twice, but the receiver of rsync
//! 3.4-3.5 builds the wrong path for such a basis when the directories differ.
//!
//! These runs only ever add what the source has under the new name, as any run would; the
//! batch's runs still decide (and delete). They are left out, and rsync copies instead,
//! when anything could make them differ from the batch's own runs: a filter rule whose
//! meaning depends on where the transfer starts (anchored, or with a `/` inside: these
//! runs start at the new name, not at the root), an include rule, filter options among
//! the user's rsync arguments, or `--inplace`/`--append`, which would write through the
//! hard links into the old names.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::rsync::{self, RsyncOptions, Run};

/// At most this many renames of one batch are replayed; the others are copied.
pub const MAX_REPLAYED: usize = 8;

/// Files smaller than this are sent again: one more rsync run costs more.
pub const MIN_FILE_BYTES: u64 = 64 << 10;

/// What a renamed name is in the source now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Dir,
    File {
        bytes: u64,
    },
    /// A symlink or a special file: sent again, it costs nothing.
    Other,
}

/// The runs that replay `renames` (old, new: relative to `root`) on the daemon target
/// `dest` (its rsync argument, ending in `/`), in order; empty when they cannot be
/// replayed faithfully (see the module docs). `found` says what a source path is now
/// (None: gone).
pub fn plan(
    root: &Path,
    dest: &OsStr,
    opts: &RsyncOptions,
    renames: &[(PathBuf, PathBuf)],
    found: impl Fn(&Path) -> Option<Found>,
) -> Vec<Run> {
    if opts.dry_run || !filters_start_anywhere(opts) || writes_in_place(&opts.extra_args) {
        return Vec::new();
    }
    let mut runs = Vec::new();
    for (old, new) in collapse(renames) {
        if runs.len() == MAX_REPLAYED {
            break;
        }
        if !plain(&old) || !plain(&new) || old.starts_with(&new) || new.starts_with(&old) {
            continue;
        }
        let (basis, source, into) = match found(&root.join(&new)) {
            Some(Found::Dir) => {
                let mut source = root.join(&new).into_os_string();
                source.push("/");
                (link_dest(&new, &old), source, new.as_path())
            }
            Some(Found::File { bytes }) if bytes >= MIN_FILE_BYTES => {
                let (old_dir, new_dir) = (parent(&old), parent(&new));
                let basis = if old_dir == new_dir {
                    OsString::from("--fuzzy")
                } else if old.file_name() == new.file_name() {
                    link_dest(new_dir, old_dir)
                } else {
                    continue;
                };
                (basis, root.join(&new).into_os_string(), new_dir)
            }
            _ => continue,
        };
        runs.push(rsync::single_run(
            opts,
            &[basis],
            source,
            dest_dir(dest, into),
        ));
    }
    runs
}

/// Chains collapsed (a->b, b->c is a->c), in the order of their last step, so that each
/// replay starts from a name the replica still has.
fn collapse(renames: &[(PathBuf, PathBuf)]) -> Vec<(PathBuf, PathBuf)> {
    let mut out: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (old, new) in renames {
        match out.iter().position(|(_, to)| to == old) {
            Some(i) => {
                let (first, _) = out.remove(i);
                if &first != new {
                    out.push((first, new.clone()));
                }
            }
            None => out.push((old.clone(), new.clone())),
        }
    }
    out
}

/// A relative path of plain names (no `.`, `..` or root): nothing else is ever replayed.
fn plain(rel: &Path) -> bool {
    !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))
}

fn parent(rel: &Path) -> &Path {
    rel.parent().unwrap_or(Path::new(""))
}

/// `--link-dest=` the directory `to` as seen from the directory `from` (both relative to
/// the target's root): the receiver resolves it relative to the destination directory.
fn link_dest(from: &Path, to: &Path) -> OsString {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    let mut arg = OsString::from("--link-dest=");
    arg.push(if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        &rel
    });
    arg
}

/// The target's directory `rel` as an rsync destination, ending in `/`.
fn dest_dir(dest: &OsStr, rel: &Path) -> OsString {
    let mut arg = dest.to_owned();
    if !rel.as_os_str().is_empty() {
        arg.push(rel);
        arg.push("/");
    }
    arg
}

/// Whether every filter rule means the same from any starting directory: a name pattern
/// (no `/` but a trailing one, no `**`) excluding, never including.
fn filters_start_anywhere(opts: &RsyncOptions) -> bool {
    let names_only = opts.excludes.iter().all(|rule| {
        if rule.starts_with("+ ") {
            return false;
        }
        let pattern = rule.strip_prefix("- ").unwrap_or(rule);
        let pattern = pattern.strip_suffix('/').unwrap_or(pattern);
        !pattern.contains('/') && !pattern.contains("**")
    });
    let filter_options = opts.extra_args.iter().any(|arg| {
        let arg = arg.as_bytes();
        [
            &b"--filter"[..],
            b"--exclude",
            b"--include",
            b"--files-from",
            b"-f",
            b"-F",
        ]
        .iter()
        .any(|opt| arg.starts_with(opt))
    });
    names_only && !filter_options
}

/// `--inplace` or `--append` among the user's rsync arguments: a file written in place
/// would change every name hard-linked to it.
fn writes_in_place(extra_args: &[OsString]) -> bool {
    extra_args.iter().any(|arg| {
        let arg = arg.as_bytes();
        arg == b"--inplace" || arg.starts_with(b"--append")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEST: &str = "rsync://u@127.0.0.1:873/m/";

    fn renames(list: &[(&str, &str)]) -> Vec<(PathBuf, PathBuf)> {
        list.iter()
            .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
            .collect()
    }

    /// The source as a table: a path ending in `/` is a directory, `name=BYTES` a file.
    fn source(entries: &'static [&'static str]) -> impl Fn(&Path) -> Option<Found> {
        move |path: &Path| {
            let rel = path.strip_prefix("/src").expect("under the root");
            entries.iter().find_map(|e| {
                if let Some(dir) = e.strip_suffix('/') {
                    (Path::new(dir) == rel).then_some(Found::Dir)
                } else if let Some((name, bytes)) = e.split_once('=') {
                    (Path::new(name) == rel).then(|| Found::File {
                        bytes: bytes.parse().expect("size"),
                    })
                } else {
                    (Path::new(e) == rel).then_some(Found::Other)
                }
            })
        }
    }

    type Renames<'a> = &'a [(&'a str, &'a str)];
    type Planned = [String; 3];

    /// Each run's last three arguments: basis, source, destination.
    fn planned(
        opts: &RsyncOptions,
        list: &[(&str, &str)],
        src: &'static [&'static str],
    ) -> Vec<[String; 3]> {
        plan(
            Path::new("/src"),
            OsStr::new(DEST),
            opts,
            &renames(list),
            source(src),
        )
        .iter()
        .map(|run| {
            let n = run.args.len();
            assert!(
                !run.args
                    .iter()
                    .any(|a| a.as_bytes().starts_with(b"--delete"))
            );
            std::array::from_fn(|i| run.args[n - 3 + i].to_string_lossy().into_owned())
        })
        .collect()
    }

    fn row(basis: &str, source: &str, dest: &str) -> [String; 3] {
        [basis.into(), source.into(), format!("{DEST}{dest}")]
    }

    #[test]
    fn each_kind_of_rename_gets_its_basis() {
        let src: &[&str] = &[
            "big2/",
            "p/q/big3/",
            "keep/",
            "keep/file=1048576",
            "d/renamed=1048576",
            "moved/other-name=1048576",
            "small=100",
            "link",
            "top=1048576",
        ];
        let opts = RsyncOptions::default();
        let table: &[(Renames, Vec<Planned>)] = &[
            // A directory: its contents, linked to the old directory's.
            (
                &[("big", "big2")],
                vec![row("--link-dest=../big", "/src/big2/", "big2/")],
            ),
            (
                &[("a/b/big", "p/q/big3")],
                vec![row(
                    "--link-dest=../../../a/b/big",
                    "/src/p/q/big3/",
                    "p/q/big3/",
                )],
            ),
            // A file that kept its name in another directory, or moved to the top.
            (
                &[("file", "keep/file")],
                vec![row("--link-dest=..", "/src/keep/file", "keep/")],
            ),
            (
                &[("x/y/top", "top")],
                vec![row("--link-dest=x/y", "/src/top", "")],
            ),
            // A file renamed in its directory.
            (
                &[("d/old", "d/renamed")],
                vec![row("--fuzzy", "/src/d/renamed", "d/")],
            ),
            // Copied: both directory and name changed; small; a symlink; gone again; a
            // directory moved into itself.
            (&[("old-name", "moved/other-name")], vec![]),
            (&[("small0", "small")], vec![]),
            (&[("link0", "link")], vec![]),
            (&[("gone0", "gone")], vec![]),
            (&[("big2/x", "big2")], vec![]),
        ];
        for (list, want) in table {
            assert_eq!(&planned(&opts, list, src), want, "{list:?}");
        }
    }

    #[test]
    fn chains_and_swaps_start_from_names_the_replica_has() {
        let src: &[&str] = &["c/", "a/", "b/"];
        let opts = RsyncOptions::default();
        // a -> b -> c: from a, the replica's name.
        assert_eq!(
            planned(&opts, &[("a0", "b0"), ("b0", "c")], src),
            vec![row("--link-dest=../a0", "/src/c/", "c/")]
        );
        // A swap through a temporary name: each from the other's old name.
        assert_eq!(
            planned(&opts, &[("a", "t"), ("b", "a"), ("t", "b")], src),
            vec![
                row("--link-dest=../b", "/src/a/", "a/"),
                row("--link-dest=../a", "/src/b/", "b/")
            ]
        );
        // There and back: nothing to replay.
        assert_eq!(
            planned(&opts, &[("a", "t"), ("t", "a")], src),
            Vec::<[String; 3]>::new()
        );
    }

    #[test]
    fn rules_that_depend_on_where_the_run_starts_leave_renames_to_rsync() {
        let src: &[&str] = &["new/"];
        let list = &[("old", "new")];
        let with = |excludes: &[&str], extra: &[&str]| RsyncOptions {
            excludes: excludes.iter().map(|s| s.to_string()).collect(),
            extra_args: extra.iter().map(OsString::from).collect(),
            ..RsyncOptions::default()
        };
        let replayed = |opts: RsyncOptions| !planned(&opts, list, src).is_empty();
        // Name rules mean the same from any directory.
        assert!(replayed(with(
            &["*.tmp", ".git/", "- cache"],
            &["--password-file=/p"]
        )));
        for excludes in [&["/top"][..], &["a/b"], &["**/x"], &["+ keep", "*"]] {
            assert!(!replayed(with(excludes, &[])), "{excludes:?}");
        }
        for extra in [
            "--filter=- x",
            "--exclude-from=f",
            "-F",
            "--inplace",
            "--append-verify",
        ] {
            assert!(!replayed(with(&[], &[extra])), "{extra}");
        }
        assert!(!replayed(RsyncOptions {
            dry_run: true,
            ..RsyncOptions::default()
        }));
    }

    #[test]
    fn at_most_a_few_renames_of_a_batch_are_replayed() {
        let list: Vec<(String, String)> = (0..20)
            .map(|i| (format!("o{i}"), format!("n{i}")))
            .collect();
        let list: Vec<(&str, &str)> = list.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let runs = plan(
            Path::new("/src"),
            OsStr::new(DEST),
            &RsyncOptions::default(),
            &renames(&list),
            |_| Some(Found::Dir),
        );
        assert_eq!(runs.len(), MAX_REPLAYED);
    }
}
