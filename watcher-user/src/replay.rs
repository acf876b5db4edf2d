//! Replaying the source's renames on a local replica before rsync runs, so a renamed
//! directory of a terabyte is a rename on the replica too, not a terabyte copied and a
//! terabyte deleted.
//!
//! A replay is only ever an optimisation: the batch's rsync runs still sync the new names
//! (they find the data in place and send only differences) and delete the old ones, so a
//! rename that cannot be replayed (the old name is not on the replica, the new one's parent
//! is missing, a directory stands in the way) is simply left to rsync, which copies. Renames
//! are replayed in the order they happened, so chains (a->b->c) and swaps through a
//! temporary name come out right. Nothing is renamed through a symlink on the replica: root
//! must never move a file outside the replica directory.

use std::path::{Component, Path, PathBuf};

/// Replays `renames` (old, new: relative to the root) in `replica`; returns how many were
/// replayed.
pub fn local(replica: &Path, renames: &[(PathBuf, PathBuf)]) -> usize {
    let mut replayed = 0;
    for (old, new) in renames {
        let (Some(from), Some(to)) = (inside(replica, old), inside(replica, new)) else {
            continue;
        };
        if std::fs::symlink_metadata(&from).is_err() {
            // Common: a file created and renamed before any batch took it.
            tracing::debug!(from = %from.display(), "rename not replayed: not on the replica; rsync copies instead");
            continue;
        }
        // rename(2) replaces a file and an empty directory, as the source's rename did; a
        // directory with contents or a change of type fails and is left to rsync.
        match std::fs::rename(&from, &to) {
            Ok(()) => replayed += 1,
            Err(e) => tracing::debug!(from = %from.display(), to = %to.display(), error = %e,
                "rename not replayed; rsync copies instead"),
        }
    }
    replayed
}

/// `replica/rel` when every directory on the way exists as a real directory (no symlink,
/// nothing missing) and `rel` names something below the replica.
fn inside(replica: &Path, rel: &Path) -> Option<PathBuf> {
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (last, dirs) = parts.split_last()?;
    let mut path = replica.to_path_buf();
    for dir in dirs {
        path.push(dir);
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return None;
        }
    }
    path.push(last);
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn renames(list: &[(&str, &str)]) -> Vec<(PathBuf, PathBuf)> {
        list.iter()
            .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
            .collect()
    }

    fn ino(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    #[test]
    fn renames_replay_in_order_and_keep_inodes() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        std::fs::create_dir_all(r.join("d/sub")).unwrap();
        std::fs::write(r.join("d/sub/f"), "f").unwrap();
        std::fs::write(r.join("a"), "a").unwrap();
        std::fs::write(r.join("b"), "b").unwrap();
        std::fs::write(r.join("x"), "x").unwrap();
        let (dir, a, b) = (ino(&r.join("d")), ino(&r.join("a")), ino(&r.join("b")));
        let n = local(
            r,
            &renames(&[
                // A directory renamed, then renamed again.
                ("d", "e"),
                ("e", "g"),
                // A swap through a temporary name.
                ("a", "tmp"),
                ("b", "a"),
                ("tmp", "b"),
                // Not on the replica: left to rsync.
                ("missing", "y"),
                // Into a directory the replica does not have: left to rsync.
                ("x", "nodir/x"),
            ]),
        );
        assert_eq!(n, 5);
        assert_eq!(ino(&r.join("g")), dir);
        assert_eq!(std::fs::read(r.join("g/sub/f")).unwrap(), b"f");
        assert_eq!((ino(&r.join("a")), ino(&r.join("b"))), (b, a));
        assert!(r.join("x").exists() && !r.join("y").exists());
    }

    #[test]
    fn nothing_moves_through_a_symlink_or_out_of_the_replica() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path().join("replica");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&r).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::fs::write(r.join("f"), "f").unwrap();
        std::os::unix::fs::symlink(&outside, r.join("link")).unwrap();
        let n = local(
            &r,
            &renames(&[
                ("link/secret", "stolen"),
                ("f", "link/f"),
                ("../replica/f", "g"),
                ("f", "/etc/f"),
            ]),
        );
        assert_eq!(n, 0);
        assert!(outside.join("secret").exists() && !outside.join("f").exists());
        assert!(r.join("f").exists() && !r.join("stolen").exists());
    }
}
