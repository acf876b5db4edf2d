//! Which folded files the subtree run already sent, so that the folded run does not read
//! them again.
//!
//! A folded file (written, and covered by a subtree of the same batch) goes through the
//! subtree run, whose quick check skips a rewrite that kept size and mtime; the folded run
//! after it compares such files by content. A file the subtree run *transferred* needs no
//! second look: rsync checked it whole as it wrote it. On a burst of new files that is
//! every one of them, and the folded run used to read each again on both sides. So the
//! subtree run prints the files it transferred (`--out-format=%i %n`), this side keeps
//! their names, and the folded run lists only the others (or does not run).
//!
//! Names rsync escaped in its output (`\#ooo`: control characters, and bytes above 0x7f
//! unless `-8`) are not decoded: such a file is compared again, as before. Past
//! [`MAX_SENT`] names none are kept and the folded run lists everything.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::Run;

/// The output format the subtree run gets when a folded run follows it: itemized, so a
/// transferred file reads `>f+++++++++ dir/name` (`<f` when pushing to a remote).
pub const SENT_FORMAT: &str = "--out-format=%i %n";

/// Most names kept from one run (as many as folded paths a batch remembers).
pub const MAX_SENT: usize = crate::dirty::FOLDED_MAX;

/// The files one run transferred, by path relative to the source root.
#[derive(Debug, Default, Clone)]
pub struct SentNames {
    names: HashSet<Vec<u8>>,
    /// More than [`MAX_SENT`]: `names` was dropped.
    overflowed: bool,
}

impl SentNames {
    /// Takes one line of the run's output into account.
    pub fn feed_line(&mut self, line: &[u8]) {
        if self.overflowed || line.len() <= 12 || line[11] != b' ' || line[1] != b'f' {
            return;
        }
        if line[0] != b'>' && line[0] != b'<' {
            return;
        }
        let name = &line[12..];
        if name.windows(2).any(|w| w == b"\\#") {
            return;
        }
        if self.names.len() >= MAX_SENT {
            self.names = HashSet::new();
            self.overflowed = true;
            return;
        }
        self.names.insert(strip_dot(name).to_vec());
    }

    fn contains(&self, path: &[u8]) -> bool {
        self.names.contains(strip_dot(path))
    }
}

fn strip_dot(path: &[u8]) -> &[u8] {
    path.strip_prefix(b"./").unwrap_or(path)
}

/// The folded run `run` without the files `sent` names; None when none of `folded` (the
/// batch's folded files) is left, and the run is not needed: the directories it also
/// lists are there for the mtimes a file sent would change.
pub fn without_sent(run: &Run, sent: &SentNames, folded: &[PathBuf]) -> Option<Run> {
    if sent.overflowed {
        return Some(run.clone());
    }
    let folded: HashSet<&[u8]> = folded.iter().map(|p| p.as_os_str().as_bytes()).collect();
    let mut stdin = Vec::with_capacity(run.stdin.len());
    let (mut paths, mut files_left) = (0, 0);
    for entry in run.stdin.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        if sent.contains(entry) {
            continue;
        }
        files_left += usize::from(folded.contains(strip_dot(entry)));
        stdin.extend_from_slice(entry);
        stdin.push(0);
        paths += 1;
    }
    (files_left > 0).then(|| Run {
        args: run.args.clone(),
        stdin,
        paths,
        role: run.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rsync::Role;

    fn sent(lines: &[&[u8]]) -> SentNames {
        let mut s = SentNames::default();
        for l in lines {
            s.feed_line(l);
        }
        s
    }

    fn folded_run(list: &[&str]) -> Run {
        let mut stdin = Vec::new();
        for p in list {
            stdin.extend_from_slice(p.as_bytes());
            stdin.push(0);
        }
        Run {
            args: vec!["--checksum".into()],
            stdin,
            paths: list.len(),
            role: Role::Folded,
        }
    }

    #[test]
    fn only_transferred_files_count_as_sent() {
        let s = sent(&[
            b">f+++++++++ t/new",
            b"<f.st...... t/pushed",
            b".f...p..... t/chmod-only",
            b"cd+++++++++ t/dir/",
            b">f+++++++++ t/esc\\#012aped",
            b"*deleting   t/gone",
            b"sent 1,234 bytes  received 56 bytes",
        ]);
        assert!(s.contains(b"t/new") && s.contains(b"./t/pushed"));
        for not in [
            &b"t/chmod-only"[..],
            b"t/dir/",
            b"t/dir",
            b"t/gone",
            b"t/esc\n",
            b"t/esc\\#012aped",
        ] {
            assert!(!s.contains(not), "{}", String::from_utf8_lossy(not));
        }
    }

    #[test]
    fn the_folded_run_keeps_what_was_not_sent_and_goes_when_nothing_is_left() {
        let run = folded_run(&["./t", "./t/a", "./t/a/f", "./t/g", "./t/h"]);
        let folded: Vec<PathBuf> = vec!["t/a/f".into(), "t/g".into(), "t/h".into()];
        // A rewrite the quick check skipped (t/h) is still compared.
        let left = without_sent(
            &run,
            &sent(&[b">f+++++++++ t/a/f", b">f.st...... t/g"]),
            &folded,
        )
        .expect("t/h is left");
        assert_eq!(left.stdin, b"./t\0./t/a\0./t/h\0");
        assert_eq!((left.paths, left.role), (3, Role::Folded));
        // Every folded file sent: no run, whatever directories were listed with them.
        let all = sent(&[b">f+++++++++ t/a/f", b">f+++++++++ t/g", b">f+++++++++ t/h"]);
        assert!(without_sent(&run, &all, &folded).is_none());
        // Nothing known: the run as planned.
        let none = without_sent(&run, &SentNames::default(), &folded).expect("kept");
        assert_eq!(none.stdin, run.stdin);
    }

    #[test]
    fn past_the_bound_nothing_is_dropped() {
        let mut s = SentNames::default();
        for i in 0..=MAX_SENT {
            s.feed_line(format!(">f+++++++++ d/f{i}").as_bytes());
        }
        let run = folded_run(&["./d", "./d/f1"]);
        let kept = without_sent(&run, &s, &["d/f1".into()]).expect("kept");
        assert_eq!(kept.stdin, run.stdin);
    }
}
