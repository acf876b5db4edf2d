//! Generated directory trees: `dNNNN/dNN/fN`, 100 subdirectories per top directory and
//! 10 small files per subdirectory (about 10 files per directory).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::proc::check_interrupted;

pub const SUBDIRS: usize = 100;
pub const FILES_PER_DIR: usize = 10;

/// A generated tree of `tops * SUBDIRS * FILES_PER_DIR` files.
pub struct Tree {
    pub root: PathBuf,
    pub tops: usize,
}

impl Tree {
    pub fn files(&self) -> usize {
        self.tops * SUBDIRS * FILES_PER_DIR
    }

    /// Directories, the root included (what `inotifywait -r` has to watch).
    pub fn dirs(&self) -> usize {
        1 + self.tops + self.tops * SUBDIRS
    }

    /// Relative path of leaf directory `(top, sub)`.
    pub fn leaf(top: usize, sub: usize) -> PathBuf {
        PathBuf::from(format!("d{top:04}")).join(format!("d{sub:02}"))
    }

    /// Writes the tree under `root`, which must not exist yet.
    pub fn generate(root: &Path, files: usize) -> Result<(Self, Duration)> {
        let tops = files.div_ceil(SUBDIRS * FILES_PER_DIR).max(1);
        let start = Instant::now();
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let leaves: Vec<PathBuf> = (0..tops)
            .flat_map(|t| (0..SUBDIRS).map(move |s| root.join(Self::leaf(t, s))))
            .collect();
        write_files(&leaves, FILES_PER_DIR, &|d, f| format!("tree {d} {f}\n"))?;
        Ok((
            Self {
                root: root.to_owned(),
                tops,
            },
            start.elapsed(),
        ))
    }
}

/// Name of file `i` in a generated directory.
pub fn file_name(i: usize) -> String {
    format!("f{i}")
}

/// Creates every directory of `dirs` (and its parents) and `per_dir` files in each,
/// named by [`file_name`], with contents `content(dir_index, file_index)`. Uses a few
/// threads, each on a contiguous run of `dirs`.
pub fn write_files(
    dirs: &[PathBuf],
    per_dir: usize,
    content: &(dyn Fn(usize, usize) -> String + Sync),
) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    let chunk = dirs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                scope.spawn(move || -> Result<()> {
                    for (k, dir) in part.iter().enumerate() {
                        check_interrupted()?;
                        fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                        let d = c * chunk + k;
                        for f in 0..per_dir {
                            let path = dir.join(file_name(f));
                            fs::write(&path, content(d, f))
                                .with_context(|| format!("writing {}", path.display()))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(_) => anyhow::bail!("a writer thread panicked"),
            }
        }
        Ok(())
    })
}

/// Number of entries of `dir` whose name does not start with a dot (rsync's temporary
/// files do); 0 if `dir` does not exist.
pub fn visible_entries(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
        .count()
}

/// Polls until each of `dirs` has `per_dir` visible entries, or until `timeout`.
/// Returns the instant the last directory was seen complete, and how many
/// directories were still incomplete (0 on success).
pub fn wait_complete(
    dirs: &[PathBuf],
    per_dir: usize,
    timeout: Duration,
) -> Result<(Instant, usize)> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&PathBuf> = dirs.iter().collect();
    loop {
        check_interrupted()?;
        pending.retain(|d| visible_entries(d) < per_dir);
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            return Ok((now, pending.len()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes a directory tree if it exists.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tree() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("t");
        let (tree, _) = Tree::generate(&root, 1000)?;
        assert_eq!(tree.files(), 1000);
        assert_eq!(tree.dirs(), 1 + 1 + SUBDIRS);
        assert_eq!(
            visible_entries(&root.join(Tree::leaf(0, 99))),
            FILES_PER_DIR
        );
        let (_, left) = wait_complete(
            &[root.join(Tree::leaf(0, 5))],
            FILES_PER_DIR,
            Duration::from_secs(1),
        )?;
        assert_eq!(left, 0);
        Ok(())
    }
}
