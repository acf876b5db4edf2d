//! Replaying the source's renames on the replica before rsync runs, so a renamed
//! directory of a terabyte is a rename on the replica too, not a terabyte copied and a
//! terabyte deleted: `rename(2)` on a local replica, `mv` over the target's own connection
//! on an ssh replica, runs that find the data on the receiver on an rsync daemon
//! ([`daemon`]).
//!
//! A replay is only ever an optimisation: the batch's rsync runs still sync the new names
//! (they find the data in place and send only differences) and delete the old ones, so a
//! rename that cannot be replayed (the old name is not on the replica, the new one's parent
//! is missing, a directory stands in the way) is simply left to rsync, which copies. Renames
//! are replayed in the order they happened, so chains (a->b->c) and swaps through a
//! temporary name come out right. Nothing is renamed through a symlink on the replica: root
//! must never move a file outside the replica directory.
//!
//! On an ssh replica the renames go to a fixed POSIX `sh` script, each name one
//! single-quoted word of the remote command ([`crate::ssh::quote::sh_quote`]: any byte but
//! NUL, which no name holds, is literal there), never spliced into the script. The script
//! renames only onto a name that does not exist (no `mv` into a directory, no replacing),
//! so a rename it cannot do exactly as `rename(2)` would is left to rsync.

use std::path::{Component, Path, PathBuf};

pub mod daemon;

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

/// The script an ssh replica runs: `$1` the replica directory, then (old, new) pairs
/// relative to it. Prints how many it renamed. No command substitution anywhere: it would
/// eat a name's trailing newlines.
pub const REMOTE_SCRIPT: &str = r#"cd -- "${1:-.}" || exit 0
shift
n=0
plain_dirs() {
  case /$1/ in */../*|*/./*|//*) return 1 ;; esac
  p=$1
  while :; do
    case $p in
      */*) p=${p%/*}
           if [ -L "$p" ] || [ ! -d "$p" ]; then return 1; fi ;;
      *) return 0 ;;
    esac
  done
}
while [ "$#" -ge 2 ]; do
  if plain_dirs "$1" && plain_dirs "$2" && { [ -e "$1" ] || [ -L "$1" ]; } &&
     [ ! -e "$2" ] && [ ! -L "$2" ] && mv -- "$1" "$2" 2>/dev/null; then
    n=$((n + 1))
  fi
  shift 2
done
echo "$n"
"#;

/// Bytes of names per remote command, well below any remote `ARG_MAX`.
const REMOTE_CHUNK_BYTES: usize = 64 << 10;

/// Replays `renames` on the replica of ssh target `link` (see the module docs); returns
/// how many were replayed. A remote that cannot be reached replays nothing: rsync copies.
pub fn ssh(link: &crate::ssh::Link, renames: &[(PathBuf, PathBuf)]) -> usize {
    let plain = |rel: &Path| {
        !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))
    };
    let usable: Vec<&(PathBuf, PathBuf)> = renames
        .iter()
        .filter(|(old, new)| plain(old) && plain(new))
        .collect();
    let mut replayed = 0;
    for chunk in chunks(&usable, REMOTE_CHUNK_BYTES) {
        let mut words: Vec<&std::ffi::OsStr> = vec![
            "sh".as_ref(),
            "-c".as_ref(),
            REMOTE_SCRIPT.as_ref(),
            "watcher-replay".as_ref(),
            link.remote_path(),
        ];
        for (old, new) in chunk {
            words.push(old.as_os_str());
            words.push(new.as_os_str());
        }
        match link.run(&words, REMOTE_TIMEOUT) {
            Ok(out) => replayed += out.trim().parse::<usize>().unwrap_or(0),
            Err(e) => {
                tracing::debug!(target = %link.label(), error = %e, "renames not replayed on the remote side; rsync copies instead");
                break;
            }
        }
    }
    replayed
}

/// Longest one remote replay command may take.
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `renames` cut into runs whose names add up to at most `budget` bytes (at least one
/// rename each).
fn chunks<'a>(
    renames: &'a [&'a (PathBuf, PathBuf)],
    budget: usize,
) -> impl Iterator<Item = &'a [&'a (PathBuf, PathBuf)]> {
    let mut rest = renames;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut used = 0;
        let mut n = 0;
        while n < rest.len() {
            let (old, new) = rest[n];
            let size = old.as_os_str().len() + new.as_os_str().len() + 8;
            if n > 0 && used + size > budget {
                break;
            }
            used += size;
            n += 1;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
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

    /// Runs the remote script the way the remote login shell would: the command line the
    /// ssh target sends, parsed by `sh -c`. Returns the count it printed.
    fn remote(replica: &Path, renames: &[(PathBuf, PathBuf)]) -> usize {
        use std::ffi::OsStr;
        let mut words: Vec<&OsStr> = vec![
            "sh".as_ref(),
            "-c".as_ref(),
            REMOTE_SCRIPT.as_ref(),
            "watcher-replay".as_ref(),
            replica.as_os_str(),
        ];
        for (old, new) in renames {
            words.push(old.as_os_str());
            words.push(new.as_os_str());
        }
        let line = crate::ssh::quote::remote_command(&words);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .current_dir(replica.parent().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn the_remote_script_renames_hostile_names_and_nothing_else() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path().join("replica");
        std::fs::create_dir_all(&r).unwrap();
        let names: Vec<PathBuf> = [
            &b"a b"[..],
            b"it's",
            b"$(touch pwned)",
            b"`touch pwned`",
            b"-rf",
            b"new\nline",
            b"trailing\n\n",
            b"\xff\xfe not utf-8",
            b"*",
            b"back\\slash",
            b";touch pwned;",
        ]
        .iter()
        .map(|b| PathBuf::from(OsStr::from_bytes(b)))
        .collect();
        let mut inodes = Vec::new();
        for n in &names {
            std::fs::write(r.join(n), n.as_os_str().as_bytes()).unwrap();
            inodes.push(ino(&r.join(n)));
        }
        std::fs::create_dir(r.join("dir $HOME")).unwrap();
        std::fs::write(r.join("dir $HOME/f"), "f").unwrap();
        let dir = ino(&r.join("dir $HOME"));
        let mut list: Vec<(PathBuf, PathBuf)> = names
            .iter()
            .map(|n| {
                let mut to = n.as_os_str().to_owned();
                to.push("-moved\n");
                (n.clone(), PathBuf::from(to))
            })
            .collect();
        list.push(("dir $HOME".into(), "dir $HOME/../-x".into()));
        list.push(("dir $HOME".into(), "renamed dir".into()));
        assert_eq!(remote(&r, &list), names.len() + 1);
        for (i, (_, to)) in list.iter().take(names.len()).enumerate() {
            assert_eq!(ino(&r.join(to)), inodes[i], "{to:?}");
        }
        assert_eq!(ino(&r.join("renamed dir")), dir);
        assert!(!r.join("pwned").exists() && !tmp.path().join("pwned").exists());
        assert!(!tmp.path().join("-x").exists());
    }

    #[test]
    fn the_remote_script_keeps_to_what_rename_would_do() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path().join("replica");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(r.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::fs::write(r.join("f"), "f").unwrap();
        std::fs::write(r.join("taken"), "t").unwrap();
        std::os::unix::fs::symlink(&outside, r.join("link")).unwrap();
        let n = remote(
            &r,
            &renames(&[
                // Through a symlink, either way.
                ("link/secret", "stolen"),
                ("f", "link/f"),
                // Onto an existing name, or into a directory: left to rsync.
                ("f", "taken"),
                ("f", "d"),
                // Not there, or its new parent missing.
                ("missing", "m2"),
                ("f", "nodir/f"),
                // A chain and a swap through a temporary name, in order.
                ("f", "g"),
                ("g", "h"),
                ("taken", "tmp"),
                ("h", "taken"),
                ("tmp", "h"),
            ]),
        );
        assert_eq!(n, 5);
        assert!(outside.join("secret").exists() && !outside.join("f").exists());
        assert_eq!(std::fs::read(r.join("taken")).unwrap(), b"f");
        assert_eq!(std::fs::read(r.join("h")).unwrap(), b"t");
        assert!(!r.join("d/f").exists() && !r.join("stolen").exists());
    }

    #[test]
    fn remote_commands_are_cut_to_a_size() {
        let list: Vec<(PathBuf, PathBuf)> = (0..100)
            .map(|i| {
                (
                    PathBuf::from(format!("old{i:04}")),
                    PathBuf::from(format!("new{i:04}")),
                )
            })
            .collect();
        let refs: Vec<&(PathBuf, PathBuf)> = list.iter().collect();
        // 7 + 7 bytes of names and 8 of quoting each: 10 to a 220-byte budget.
        let cut: Vec<usize> = chunks(&refs, 220).map(<[_]>::len).collect();
        assert_eq!(cut, [10; 10]);
        // A rename bigger than the budget still goes, alone.
        assert_eq!(
            chunks(&refs[..2], 1).map(<[_]>::len).collect::<Vec<_>>(),
            [1, 1]
        );
    }
}
