//! The record the eBPF probes write into the ring buffer, and the names of their maps.
//! Both sides compile this file, so the layout cannot drift.
#![no_std]

/// Bytes kept of each user path (with its NUL). A longer path is reported as truncated,
/// and user space rescans instead of guessing.
pub const PATH_LEN: usize = 512;

/// Linux ABI constants both sides interpret records with (x86_64 values; the probe has
/// no libc).
pub mod abi {
    pub const AT_FDCWD: i32 = -100;
    pub const AT_REMOVEDIR: u32 = 0x200;
    pub const AT_EMPTY_PATH: u32 = 0x1000;
    pub const O_WRONLY: u32 = 0o1;
    pub const O_RDWR: u32 = 0o2;
    pub const O_CREAT: u32 = 0o100;
    pub const O_TRUNC: u32 = 0o1000;
    pub const O_DIRECTORY: u32 = 0o200000;
    /// `__O_TMPFILE` without the `O_DIRECTORY` bit that `O_TMPFILE` includes.
    pub const O_TMPFILE_ONLY: u32 = 0o20000000;
    pub const RENAME_EXCHANGE: u32 = 2;
    pub const CLONE_THREAD: u64 = 0x10000;
}

/// What a record reports, normalised from the syscall that made it.
pub mod op {
    /// open/openat/openat2/creat with write, create or truncate flags, or of a directory
    /// (`flags`: open flags, `ret`: the new fd, `fd1`/`path1`: where).
    pub const OPEN: u32 = 1;
    /// close of an fd the probe tracked since its open (`fd1`; `flags` is [`super::TRACK_WRITE`] or [`super::TRACK_DIR`]).
    pub const CLOSE: u32 = 2;
    /// Content changed through an fd: ftruncate, fallocate (`fd1`).
    pub const FD_MODIFY: u32 = 3;
    /// Metadata changed through an fd: fchmod, fchown, fsetxattr, fremovexattr, futimens (`fd1`).
    pub const FD_ATTRIB: u32 = 4;
    /// Content changed by path: truncate (`fd1`/`path1`).
    pub const PATH_MODIFY: u32 = 5;
    /// Metadata changed by path: chmod, chown, utimensat, setxattr... (`fd1`/`path1`,
    /// `flags`: the AT_ flags, AT_EMPTY_PATH meaning `fd1` itself).
    pub const PATH_ATTRIB: u32 = 6;
    /// unlink/unlinkat/rmdir (`flags` & AT_REMOVEDIR for a directory).
    pub const UNLINK: u32 = 7;
    /// mkdir/mkdirat.
    pub const MKDIR: u32 = 8;
    /// mknod/mknodat.
    pub const MKNOD: u32 = 9;
    /// rename/renameat/renameat2 (`fd1`/`path1` old, `fd2`/`path2` new, `flags`).
    pub const RENAME: u32 = 10;
    /// link/linkat (`fd1`/`path1` old, `fd2`/`path2` new, `flags`).
    pub const LINK: u32 = 11;
    /// symlink/symlinkat (`fd1`/`path1`: the new link).
    pub const SYMLINK: u32 = 12;
    /// A new process (fork/vfork/clone/clone3), reported by the child (`tgid`) with its
    /// parent's tgid in `ret`: it starts in the parent's working directory with its fds.
    pub const FORK: u32 = 13;
    /// chdir (`fd1` AT_FDCWD, `path1`) or fchdir (`fd1`, no path).
    pub const CHDIR: u32 = 14;
    /// dup/dup2/dup3/fcntl(F_DUPFD*) of a tracked fd (`fd1` the old fd, `ret` the new one).
    pub const DUP: u32 = 15;
}

/// Offsets of the kernel struct fields the probes read, from the kernel's BTF (user space
/// fills the config map). `real_parent`/`tgid` zero: no parent check. `filter` zero: no
/// filtering by root (some offset unknown, or turned off).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct KernelOffsets {
    pub real_parent: u32,
    pub tgid: u32,
    /// task_struct.files -> files_struct.fdt -> fdtable.{max_fds, fd}: an fd's `struct file`.
    pub files: u32,
    pub fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    /// file.f_path.dentry.
    pub f_dentry: u32,
    /// task_struct.fs -> fs_struct.pwd.dentry: the working directory.
    pub fs: u32,
    pub pwd_dentry: u32,
    pub d_parent: u32,
    pub d_inode: u32,
    pub d_sb: u32,
    pub i_ino: u32,
    pub s_dev: u32,
    /// Nonzero: drop changes to files outside every root (see [`RootKey`]).
    pub filter: u32,
    /// For the VFS probe set: dentry.d_name.name, file.f_mode, file.f_inode,
    /// kiocb.ki_filp, renamedata.old_dentry and .new_dentry.
    pub d_name: u32,
    pub f_mode: u32,
    pub f_inode: u32,
    pub ki_filp: u32,
    pub rd_old_dentry: u32,
    pub rd_new_dentry: u32,
    /// open_flags.open_flag (offset 0 is a real offset here).
    pub open_flag: u32,
    /// inode.i_mode (offset 0 is a real offset here), and nonzero `dir_check` when it and
    /// every field from the task to a `struct file`'s inode are known: the syscall probes
    /// then track a directory opened without O_DIRECTORY as one opened with it.
    pub i_mode: u32,
    pub dir_check: u32,
    /// How many entries of the root paths map are filled (see [`RootPath`]); zero: an
    /// absolute path is never dropped in the kernel.
    pub root_paths: u32,
}

/// Entries of the root paths map: at most this many roots, each at most
/// [`ROOT_PATH_LEN`] bytes. With more or longer roots the map is left empty.
pub const MAX_ROOT_PATHS: usize = 16;
pub const ROOT_PATH_LEN: usize = 256;

/// A source root (or a mount point below one) as an absolute path, without a trailing
/// `/`, for the probes' lexical test of absolute paths. A path that starts with none of
/// them, and that none of them starts with, is outside every root and above none: the
/// same answer user space reaches, which does not follow symlinks either.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RootPath {
    pub len: u32,
    pub path: [u8; ROOT_PATH_LEN],
}

impl RootPath {
    /// `path` as an entry, or None when it is too long.
    pub fn new(path: &[u8]) -> Option<RootPath> {
        let path = match path {
            [rest @ .., b'/'] if !rest.is_empty() => rest,
            _ => path,
        };
        if path.len() > ROOT_PATH_LEN || path.first() != Some(&b'/') {
            return None;
        }
        let mut out = RootPath {
            len: path.len() as u32,
            path: [0; ROOT_PATH_LEN],
        };
        out.path[..path.len()].copy_from_slice(path);
        Some(out)
    }
}

/// Bytes of a path the VFS probes build from a dentry, leaf first.
pub const VFS_PATH_LEN: usize = 2048;
/// A name is copied whole (up to NAME_MAX and its NUL) past any offset below
/// [`VFS_PATH_LEN`], so the buffer has this much room behind it.
pub const VFS_PATH_BUF: usize = VFS_PATH_LEN + 256;

/// What the VFS probe set (fentry/fexit on the kernel's VFS functions) reports: a change
/// to the dentry whose path, relative to its filesystem's root, is in `path1` (`path2`:
/// the new name of a rename). Paths are written leaf first, each name followed by `/`
/// (`c/b/a/` for `a/b/c`); a negative length means the walk did not reach the filesystem
/// root (too deep or too long) and the path is unknown.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VfsRecord {
    pub tgid: u32,
    pub pid: u32,
    /// One of [`vfs_op`].
    pub op: u32,
    /// The kernel `dev_t` of the dentry's superblock.
    pub dev: u32,
    pub len1: i32,
    pub len2: i32,
    pub path1: [u8; VFS_PATH_BUF],
    pub path2: [u8; VFS_PATH_BUF],
}

/// Operations of [`VfsRecord`]s.
pub mod vfs_op {
    /// A new file, device node, symlink or hard link (an open with O_CREAT, vfs_create,
    /// vfs_mknod, vfs_symlink, vfs_link).
    pub const CREATE: u32 = 101;
    pub const MKDIR: u32 = 102;
    /// vfs_unlink (a file) or vfs_rmdir (a directory, `DIR` set).
    pub const REMOVE: u32 = 103;
    pub const REMOVE_DIR: u32 = 104;
    /// Attributes, size or xattrs: notify_change, vfs_setxattr, vfs_removexattr.
    pub const ATTRIB: u32 = 105;
    /// First write to a file since it was last reported (file_modified,
    /// kiocb_modified, file_update_time).
    pub const MODIFY: u32 = 106;
    /// Last close of a file written since it was last reported (__fput).
    pub const CLOSE_WRITE: u32 = 107;
    /// vfs_rename: `path1` the old name, `path2` the new one.
    pub const RENAME: u32 = 108;
}

/// The VFS functions the VFS probe set attaches to: (program, kernel function, fexit?).
pub const VFS_PROGRAMS: &[(&str, &str, bool)] = &[
    ("watcher_filp_open", "do_filp_open", true),
    ("watcher_vfs_create", "vfs_create", true),
    ("watcher_vfs_mkdir", "vfs_mkdir", true),
    ("watcher_vfs_mknod", "vfs_mknod", true),
    ("watcher_vfs_symlink", "vfs_symlink", true),
    ("watcher_vfs_link", "vfs_link", true),
    ("watcher_vfs_unlink", "vfs_unlink", true),
    ("watcher_vfs_rmdir", "vfs_rmdir", true),
    ("watcher_vfs_rename_enter", "vfs_rename", false),
    ("watcher_vfs_rename", "vfs_rename", true),
    ("watcher_notify_change", "notify_change", true),
    ("watcher_vfs_setxattr", "vfs_setxattr", true),
    ("watcher_vfs_removexattr", "vfs_removexattr", true),
    ("watcher_file_modified", "file_modified", false),
    ("watcher_kiocb_modified", "kiocb_modified", false),
    ("watcher_file_update_time", "file_update_time", false),
    ("watcher_fput", "__fput", false),
];

/// A directory by filesystem and inode: the kernel's `dev_t` of its superblock
/// (`MAJOR << 20 | MINOR`) and its inode number. Keys of the roots map.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, Hash)]
pub struct RootKey {
    pub dev: u32,
    pub pad: u32,
    pub ino: u64,
}

/// Values of the roots map: a source root (a file is inside when one of its ancestor
/// directories is one), or a directory above a root (opening it may lead to a root).
pub const ROOT: u32 = 1;
pub const ROOT_ANCESTOR: u32 = 2;

/// Kinds of tracked fds (values of the tracked-fd map and `flags` of a CLOSE).
pub const TRACK_WRITE: u32 = 1;
pub const TRACK_DIR: u32 = 2;

/// Values of the ignored-tgid map: the daemon (kept until user space removes it) and
/// processes it forked (removed when they exit).
pub const IGNORE_SELF: u32 = 1;
pub const IGNORE_CHILD: u32 = 2;

/// Indexes of the per-CPU counter array.
pub mod counter {
    /// Records dropped because the ring buffer was full.
    pub const LOST: u32 = 0;
    /// Syscalls of interest made by ignored processes, dropped in the kernel.
    pub const OWN_DROPPED: u32 = 1;
    /// Records written.
    pub const WRITTEN: u32 = 2;
    /// Changes to files outside every root, dropped in the kernel.
    pub const OUTSIDE_DROPPED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Map and program names in the object.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_IGNORED: &str = "IGNORED";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_ROOTS: &str = "ROOTS";
pub const MAP_DEVICES: &str = "DEVICES";
pub const MAP_ROOT_PATHS: &str = "ROOT_PATHS";
pub const PROG_SYS_EXIT: &str = "watcher_sys_exit";
pub const PROG_SYS_ENTER: &str = "watcher_sys_enter";
pub const PROG_PROCESS_EXIT: &str = "watcher_process_exit";

/// One successful syscall that changed (or may change) a path.
///
/// In the ring buffer a record is sized to its paths: the fields up to `path1`
/// ([`RECORD_HEADER`] bytes), then `max(len1, 0)` bytes of `path1` and right after them
/// `max(len2, 0)` bytes of `path2` ([`packed_len`]). A record whose two paths do not fit
/// in [`PATH_LEN`] bytes together is written whole, [`size_of::<Record>()`] bytes, with
/// `path2` in its own array.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Record {
    pub tgid: u32,
    pub pid: u32,
    /// One of [`op`].
    pub op: u32,
    pub flags: u32,
    /// The syscall's return value (the fd for OPEN).
    pub ret: i64,
    /// Directory fd for `path1`, or the fd of an fd-based call.
    pub fd1: i32,
    /// Directory fd for `path2`.
    pub fd2: i32,
    /// `bpf_probe_read_user_str`'s result for each path: bytes copied with the NUL, 0 for
    /// no path (NULL pointer), negative on a fault. `PATH_LEN` means possibly truncated.
    pub len1: i32,
    pub len2: i32,
    pub path1: [u8; PATH_LEN],
    pub path2: [u8; PATH_LEN],
}

/// Bytes of a [`Record`] before its paths.
pub const RECORD_HEADER: usize = core::mem::offset_of!(Record, path1);

/// Bytes of path kept for a `len1`/`len2` of a record (a fault or no path keeps none).
pub fn path_bytes(len: i32) -> usize {
    (len.max(0) as usize).min(PATH_LEN)
}

/// The size of a record in the ring buffer with these path lengths: packed when both
/// paths fit in one array, else whole.
pub fn packed_len(len1: i32, len2: i32) -> usize {
    let paths = path_bytes(len1) + path_bytes(len2);
    if paths <= PATH_LEN {
        RECORD_HEADER + paths
    } else {
        core::mem::size_of::<Record>()
    }
}
