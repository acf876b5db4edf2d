//! The records an inotify descriptor returns: `struct inotify_event` headers, each with
//! its NUL-padded name, parsed from the bytes of one read with names kept as bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// Size of `struct inotify_event` before its name.
const EVENT_HEADER: usize = 16;

/// One record as read from an inotify descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawEvent<'a> {
    pub(super) wd: i32,
    pub(super) mask: u32,
    pub(super) cookie: u32,
    /// Empty for events about the watched directory itself.
    pub(super) name: &'a OsStr,
}

/// Splits what one read returned into records; the kernel only returns whole ones.
pub(super) fn parse_events(buf: &[u8]) -> Vec<RawEvent<'_>> {
    let field = |at: usize| -> [u8; 4] {
        let mut b = [0u8; 4];
        b.copy_from_slice(&buf[at..at + 4]);
        b
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at + EVENT_HEADER <= buf.len() {
        let wd = i32::from_ne_bytes(field(at));
        let mask = u32::from_ne_bytes(field(at + 4));
        let cookie = u32::from_ne_bytes(field(at + 8));
        let len = u32::from_ne_bytes(field(at + 12)) as usize;
        let end = (at + EVENT_HEADER + len).min(buf.len());
        // The name is NUL-padded to an aligned length.
        let raw = &buf[at + EVENT_HEADER..end];
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name: OsStr::from_bytes(name),
        });
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, cookie: u32, name: &[u8]) -> Vec<u8> {
        let padded = name.len().div_ceil(16) * 16;
        let mut b = Vec::new();
        b.extend_from_slice(&wd.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&cookie.to_ne_bytes());
        b.extend_from_slice(&(padded as u32).to_ne_bytes());
        b.extend_from_slice(name);
        b.resize(b.len() + padded - name.len(), 0);
        b
    }

    #[test]
    fn records_are_parsed_with_byte_names() {
        let mut buf = record(3, libc::IN_CREATE, 0, b"f\xff");
        buf.extend(record(4, libc::IN_IGNORED, 0, b""));
        buf.extend(record(
            5,
            libc::IN_MOVED_TO | libc::IN_ISDIR,
            9,
            b"0123456789abcdef",
        ));
        let evs = parse_events(&buf);
        assert_eq!(
            evs,
            [
                RawEvent {
                    wd: 3,
                    mask: libc::IN_CREATE,
                    cookie: 0,
                    name: OsStr::from_bytes(b"f\xff")
                },
                RawEvent {
                    wd: 4,
                    mask: libc::IN_IGNORED,
                    cookie: 0,
                    name: OsStr::new("")
                },
                RawEvent {
                    wd: 5,
                    mask: libc::IN_MOVED_TO | libc::IN_ISDIR,
                    cookie: 9,
                    name: OsStr::new("0123456789abcdef")
                },
            ]
        );
    }
}
