//! The event mask fanotify and inotify share: fanotify's bits for directory-entry and
//! inode events have inotify's values (both are fsnotify's), so one function says what a
//! mask means for both backends.

use fanotify_fid::consts as fan;

use crate::event::ChangeKind;

// The shared values this module relies on.
const _: () = {
    assert!(fan::FAN_MODIFY == libc::IN_MODIFY as u64);
    assert!(fan::FAN_ATTRIB == libc::IN_ATTRIB as u64);
    assert!(fan::FAN_CLOSE_WRITE == libc::IN_CLOSE_WRITE as u64);
    assert!(fan::FAN_MOVED_FROM == libc::IN_MOVED_FROM as u64);
    assert!(fan::FAN_MOVED_TO == libc::IN_MOVED_TO as u64);
    assert!(fan::FAN_CREATE == libc::IN_CREATE as u64);
    assert!(fan::FAN_DELETE == libc::IN_DELETE as u64);
};

/// The change a directory-entry or inode event's `mask` reports, None when it reports
/// none of them (self events, overflow, ignored watches). A merged mask counts as its
/// most far-reaching change: a creation with writes is a creation, so a new directory
/// is synced with what is inside it. A write and the close after it that the kernel
/// merged into one event count as the close, the event a reader of whole files waits for.
pub(crate) fn change_kind(mask: u64) -> Option<ChangeKind> {
    let has = |bits: u32| mask & u64::from(bits) != 0;
    Some(if has(libc::IN_MOVED_TO) {
        ChangeKind::MovedTo
    } else if has(libc::IN_CREATE) {
        ChangeKind::Created
    } else if has(libc::IN_MOVED_FROM) {
        ChangeKind::MovedFrom
    } else if has(libc::IN_DELETE) {
        ChangeKind::Deleted
    } else if has(libc::IN_CLOSE_WRITE) {
        ChangeKind::CloseWrite
    } else if has(libc::IN_MODIFY) {
        ChangeKind::Modified
    } else if has(libc::IN_ATTRIB) {
        ChangeKind::Attrib
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_become_kinds() {
        use ChangeKind::*;
        let table: &[(u32, Option<ChangeKind>)] = &[
            (libc::IN_CREATE, Some(Created)),
            (
                libc::IN_CREATE | libc::IN_MODIFY | libc::IN_CLOSE_WRITE,
                Some(Created),
            ),
            (libc::IN_MODIFY, Some(Modified)),
            (libc::IN_CLOSE_WRITE, Some(CloseWrite)),
            (libc::IN_MODIFY | libc::IN_CLOSE_WRITE, Some(CloseWrite)),
            (libc::IN_ATTRIB, Some(Attrib)),
            (libc::IN_MODIFY | libc::IN_ATTRIB, Some(Modified)),
            (libc::IN_DELETE, Some(Deleted)),
            (libc::IN_MOVED_FROM, Some(MovedFrom)),
            (libc::IN_MOVED_TO, Some(MovedTo)),
            (libc::IN_MOVED_TO | libc::IN_CREATE, Some(MovedTo)),
            (libc::IN_MOVED_FROM | libc::IN_DELETE, Some(MovedFrom)),
            (libc::IN_ISDIR | libc::IN_CREATE, Some(Created)),
            (libc::IN_DELETE_SELF, None),
            (libc::IN_MOVE_SELF, None),
            (libc::IN_IGNORED, None),
            (libc::IN_Q_OVERFLOW, None),
        ];
        for &(mask, want) in table {
            assert_eq!(change_kind(u64::from(mask)), want, "mask {mask:#x}");
        }
    }
}
