//! What `watcher check` concludes from the backends' rows: which of the given paths no
//! backend can watch (then it exits non-zero), so a script can trust its exit code.

use std::path::{Path, PathBuf};

use crate::backend::Support;

/// Whether `backend` can watch `path`: its kernel-wide rows allow it (any one of them ok,
/// e.g. one of the ebpf probe sets loads) and every row it has for `path` is ok.
fn usable(rows: &[Support], backend: &str, path: &Path) -> bool {
    let mine: Vec<&Support> = rows.iter().filter(|r| r.backend == backend).collect();
    let kernel: Vec<&&Support> = mine.iter().filter(|r| r.path.is_none()).collect();
    let here: Vec<&&Support> = mine
        .iter()
        .filter(|r| r.path.as_deref() == Some(path))
        .collect();
    !mine.is_empty()
        && (kernel.is_empty() || kernel.iter().any(|r| r.ok))
        && here.iter().all(|r| r.ok)
}

/// The paths no backend can watch: not a directory (`is_dir` says which are), or no
/// backend's rows allow it (a backend with only kernel-wide rows, like ebpf, takes any
/// directory).
pub fn unwatchable(
    rows: &[Support],
    paths: &[PathBuf],
    is_dir: impl Fn(&Path) -> bool,
) -> Vec<PathBuf> {
    let mut backends: Vec<&str> = rows.iter().map(|r| r.backend).collect();
    backends.sort_unstable();
    backends.dedup();
    paths
        .iter()
        .filter(|p| !is_dir(p) || !backends.iter().any(|b| usable(rows, b, p)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(backend: &'static str, path: Option<&str>, ok: bool) -> Support {
        Support {
            backend,
            path: path.map(PathBuf::from),
            ok,
            detail: String::new(),
        }
    }

    #[test]
    fn a_path_needs_one_backend_that_works_for_it() {
        let paths = [PathBuf::from("/a"), PathBuf::from("/b")];
        let table: &[(&[Support], &[&str])] = &[
            // Unprivileged: fanotify refused by the kernel, inotify fine on /a only.
            (
                &[
                    row("fanotify", None, false),
                    row("inotify", Some("/a"), true),
                    row("inotify", Some("/b"), false),
                ],
                &["/b"],
            ),
            // fanotify marks /a but not /b (overlayfs); inotify takes /b.
            (
                &[
                    row("fanotify", None, true),
                    row("fanotify", Some("/a"), true),
                    row("fanotify", Some("/b"), false),
                    row("inotify", Some("/b"), true),
                ],
                &[],
            ),
            // One of the ebpf probe sets loads: the backend works.
            (
                &[
                    row("ebpf", None, false),
                    row("ebpf", None, true),
                    row("fanotify", None, false),
                ],
                &[],
            ),
            (
                &[row("fanotify", None, false), row("ebpf", None, false)],
                &["/a", "/b"],
            ),
            (&[], &["/a", "/b"]),
        ];
        for (rows, want) in table {
            let got = unwatchable(rows, &paths, |_| true);
            let want: Vec<PathBuf> = want.iter().map(PathBuf::from).collect();
            assert_eq!(got, want, "{rows:?}");
        }
        // ebpf has kernel-wide rows only: it takes any directory, but /b is none (missing,
        // a file).
        let rows = [row("ebpf", None, true)];
        let got = unwatchable(&rows, &paths, |p| p != Path::new("/b"));
        assert_eq!(got, [PathBuf::from("/b")]);
    }
}
