//! The two quoting rules an ssh target meets. rsync splits its `-e` string itself, at
//! spaces, with `'` and `"` quoting (a doubled quote inside stands for itself); no shell
//! is involved. A remote command travels as one string that the remote login shell
//! parses, so each word is single-quoted for a POSIX shell. Names are bytes and may be
//! anything.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Splits an `-e` string the way rsync does: at spaces, `'...'` and `"..."` quote, and a
/// doubled quote character inside quotes stands for itself.
pub fn split_rsh(cmd: &OsStr) -> Vec<OsString> {
    let mut args = Vec::new();
    let mut word: Option<Vec<u8>> = None;
    let mut quote: Option<u8> = None;
    let bytes = cmd.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        i += 1;
        match quote {
            None if c == b' ' => {
                if let Some(w) = word.take() {
                    args.push(OsString::from_vec(w));
                }
            }
            None if c == b'\'' || c == b'"' => {
                quote = Some(c);
                word.get_or_insert_with(Vec::new);
            }
            Some(q) if c == q => {
                if bytes.get(i) == Some(&q) {
                    word.get_or_insert_with(Vec::new).push(q);
                    i += 1;
                } else {
                    quote = None;
                }
            }
            _ => word.get_or_insert_with(Vec::new).push(c),
        }
    }
    if let Some(w) = word {
        args.push(OsString::from_vec(w));
    }
    args
}

/// Joins words into an `-e` string that [`split_rsh`] (rsync) splits back into them.
pub fn join_rsh(words: &[OsString]) -> OsString {
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        let b = w.as_bytes();
        if !b.is_empty() && !b.iter().any(|c| b" '\"".contains(c)) {
            out.extend_from_slice(b);
        } else {
            out.push(b'\'');
            for &c in b {
                out.push(c);
                if c == b'\'' {
                    out.push(b'\'');
                }
            }
            out.push(b'\'');
        }
    }
    OsString::from_vec(out)
}

/// One word for a POSIX shell, whatever its bytes: single-quoted, each `'` as `'\''`.
pub fn sh_quote(word: &OsStr) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &c in word.as_bytes() {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// A command line for the remote login shell: every word quoted, so the remote side runs
/// exactly these words.
pub fn remote_command(words: &[&OsStr]) -> OsString {
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend(sh_quote(w));
    }
    OsString::from_vec(out)
}

/// Takes the remote shell out of rsync arguments (`-e CMD`, `-eCMD`, `--rsh=CMD`,
/// `--rsh CMD`): the last one given, as rsync would use it.
pub fn take_rsh(args: &mut Vec<OsString>) -> Option<OsString> {
    let mut found = None;
    let mut kept = Vec::with_capacity(args.len());
    let mut it = std::mem::take(args).into_iter();
    while let Some(arg) = it.next() {
        let b = arg.as_bytes();
        if b == b"-e" || b == b"--rsh" {
            found = it.next();
        } else if let Some(rest) = b.strip_prefix(b"--rsh=") {
            found = Some(OsStr::from_bytes(rest).to_owned());
        } else if b.len() > 2 && b.starts_with(b"-e") {
            found = Some(OsStr::from_bytes(&b[2..]).to_owned());
        } else {
            kept.push(arg);
        }
    }
    *args = kept;
    found
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    pub(crate) use crate::ssh::tests::{hostile, os};

    #[test]
    fn rsh_strings_split_like_rsync() {
        let table: &[(&str, &[&str])] = &[
            ("ssh", &["ssh"]),
            ("ssh  -p 2222", &["ssh", "-p", "2222"]),
            ("ssh -i '/a b/key'", &["ssh", "-i", "/a b/key"]),
            ("ssh -o \"Foo=a b\"", &["ssh", "-o", "Foo=a b"]),
            ("ssh 'it''s'", &["ssh", "it's"]),
            ("ssh ''", &["ssh", ""]),
            ("ssh a'b c'd", &["ssh", "ab cd"]),
        ];
        for (cmd, want) in table {
            let want: Vec<OsString> = want.iter().map(|w| os(w)).collect();
            assert_eq!(split_rsh(OsStr::new(cmd)), want, "{cmd}");
        }
    }

    #[test]
    fn joined_rsh_splits_back_to_the_same_words() {
        let mut words = vec![os("ssh")];
        words.extend(hostile());
        assert_eq!(split_rsh(&join_rsh(&words)), words);
    }

    #[test]
    fn rsh_is_taken_out_of_rsync_arguments() {
        let table: &[(&[&str], Option<&str>, &[&str])] = &[
            (&["--numeric-ids"], None, &["--numeric-ids"]),
            (&["-e", "ssh -p 2", "-z"], Some("ssh -p 2"), &["-z"]),
            (&["-essh -p 3"], Some("ssh -p 3"), &[]),
            (&["--rsh=ssh -p 4", "-z"], Some("ssh -p 4"), &["-z"]),
            (&["--rsh", "a", "--rsh=b"], Some("b"), &[]),
        ];
        for (args, rsh, rest) in table {
            let mut v: Vec<OsString> = args.iter().map(|a| os(a)).collect();
            assert_eq!(take_rsh(&mut v), rsh.map(os), "{args:?}");
            assert_eq!(
                v,
                rest.iter().map(|a| os(a)).collect::<Vec<_>>(),
                "{args:?}"
            );
        }
    }

    /// What a POSIX shell makes of a remote command line: the exact words, bytes and all,
    /// with nothing expanded, run, or read as an option.
    #[test]
    fn remote_commands_survive_the_remote_shell() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = hostile();
        let mut words: Vec<&OsStr> = vec![OsStr::new("printf"), OsStr::new("%s\\0")];
        words.extend(names.iter().map(OsString::as_os_str));
        let line = remote_command(&words);
        let out = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .current_dir(dir.path())
            .output()
            .expect("sh");
        assert!(out.status.success(), "{out:?}");
        let mut want = Vec::new();
        for n in &names {
            want.extend_from_slice(n.as_bytes());
            want.push(0);
        }
        assert_eq!(out.stdout, want);
        assert!(!dir.path().join("pwned").exists(), "a name was run");
    }
}
