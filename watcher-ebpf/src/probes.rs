//! The eBPF probes of the ebpf backend: a raw tracepoint on `sys_exit` (no tracefs needed)
//! that reports every successful path-changing syscall as a [`Record`] in a ring buffer,
//! one on `sys_enter` for the close of a tracked fd, and one on `sched_process_exit`
//! that forgets exited children of the daemon.
//!
//! Records are written at syscall exit, where the return value says whether the call
//! succeeded and the arguments are still in the saved registers (and the path strings in
//! the caller's memory, just read by the syscall), so no entry/exit map is needed.
//! Paths are the caller's strings as given; user space resolves relative ones.
//! Syscall numbers are x86_64's.
//!
//! Most of the syscalls a busy machine makes are let go after the syscall number (one
//! read of the saved registers) or, for opens and fcntl, their flags, before any map
//! lookup: a read-only open of a file makes no record. A later fchmod, fchown or
//! ftruncate through such an fd is reported with the path of the fd's dentry, as the VFS
//! probes report changes (vfs.rs).

use aya_ebpf::EbpfContext;
use core::ffi::c_void;

use aya_ebpf::helpers::generated::{
    bpf_get_current_task, bpf_loop, bpf_probe_read_kernel as probe_read_kernel_raw,
    bpf_probe_read_user_str,
};
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user};
use aya_ebpf::macros::{map, raw_tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::RawTracePointContext;
use aya_log_ebpf::{debug, warn};
use watcher_ebpf_common::vfs_op;
use watcher_ebpf_common::{
    IGNORE_CHILD, KernelOffsets, MAX_ROOT_PATHS, PATH_LEN, RECORD_HEADER, ROOT, ROOT_ANCESTOR,
    ROOT_PATH_LEN, Record, RootKey, RootPath, TRACK_DIR, TRACK_WRITE, counter, op, path_bytes,
};

/// Records; user space sets the size at load time.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

/// Room to build a record, copied sized to its paths into [`EVENTS`] (a record is too
/// big for the stack, and a ring buffer entry's size must be known when it is reserved).
#[map]
static RECORD: PerCpuArray<Record> = PerCpuArray::with_max_entries(1, 0);

/// Processes whose syscalls are not reported: the daemon and its descendants.
#[map]
static IGNORED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(8192, 0);

/// fds opened for writing or on a directory, keyed by tgid << 32 | fd: their close is reported.
#[map]
static TRACKED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1 << 16, 0);

/// Offsets of kernel struct fields, from the kernel's BTF (user space fills it).
#[map]
pub(crate) static CONFIG: Array<KernelOffsets> = Array::with_max_entries(1, 0);

/// The source roots, and the directories above them, by (device, inode).
#[map]
static ROOTS: HashMap<RootKey, u32> = HashMap::with_max_entries(4096, 0);

/// The source roots as absolute paths, for the absolute paths given to syscalls (the
/// first `KernelOffsets::root_paths` entries are filled).
#[map]
static ROOT_PATHS: Array<RootPath> = Array::with_max_entries(MAX_ROOT_PATHS as u32, 0);

/// Devices (kernel `dev_t`) of the filesystems that hold a source root.
#[map]
static DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);

/// Ancestors looked at before giving up on finding a root above a file (it is then
/// reported, and user space decides).
const MAX_DEPTH: usize = 48;

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

// struct pt_regs on x86_64.
const REG_R10: usize = 56;
const REG_DI: usize = 112;
const REG_ORIG_AX: usize = 120;

use watcher_ebpf_common::abi::{
    AT_FDCWD, AT_REMOVEDIR, CLONE_THREAD, O_CREAT, O_DIRECTORY, O_RDWR, O_TRUNC, O_WRONLY,
};

mod nr {
    pub const CLOSE: u64 = 3;
    pub const DUP: u64 = 32;
    pub const DUP2: u64 = 33;
    pub const FCNTL: u64 = 72;
    pub const DUP3: u64 = 292;
    pub const OPEN: u64 = 2;
    pub const CLONE: u64 = 56;
    pub const FORK: u64 = 57;
    pub const VFORK: u64 = 58;
    pub const TRUNCATE: u64 = 76;
    pub const CHDIR: u64 = 80;
    pub const FCHDIR: u64 = 81;
    pub const FTRUNCATE: u64 = 77;
    pub const RENAME: u64 = 82;
    pub const MKDIR: u64 = 83;
    pub const RMDIR: u64 = 84;
    pub const CREAT: u64 = 85;
    pub const LINK: u64 = 86;
    pub const UNLINK: u64 = 87;
    pub const SYMLINK: u64 = 88;
    pub const CHMOD: u64 = 90;
    pub const FCHMOD: u64 = 91;
    pub const CHOWN: u64 = 92;
    pub const FCHOWN: u64 = 93;
    pub const LCHOWN: u64 = 94;
    pub const UTIME: u64 = 132;
    pub const MKNOD: u64 = 133;
    pub const SETXATTR: u64 = 188;
    pub const LSETXATTR: u64 = 189;
    pub const FSETXATTR: u64 = 190;
    pub const REMOVEXATTR: u64 = 197;
    pub const LREMOVEXATTR: u64 = 198;
    pub const FREMOVEXATTR: u64 = 199;
    pub const UTIMES: u64 = 235;
    pub const OPENAT: u64 = 257;
    pub const MKDIRAT: u64 = 258;
    pub const MKNODAT: u64 = 259;
    pub const FCHOWNAT: u64 = 260;
    pub const FUTIMESAT: u64 = 261;
    pub const UNLINKAT: u64 = 263;
    pub const RENAMEAT: u64 = 264;
    pub const LINKAT: u64 = 265;
    pub const SYMLINKAT: u64 = 266;
    pub const FCHMODAT: u64 = 268;
    pub const UTIMENSAT: u64 = 280;
    pub const FALLOCATE: u64 = 285;
    pub const RENAMEAT2: u64 = 316;
    pub const CLONE3: u64 = 435;
    pub const OPENAT2: u64 = 437;
    pub const FCHMODAT2: u64 = 452;
    pub const SETXATTRAT: u64 = 463;
    pub const REMOVEXATTRAT: u64 = 466;
}

/// Adds one to a per-CPU counter; returns its new value on this CPU.
#[inline(always)]
pub(crate) fn bump(index: u32) -> u64 {
    match COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    }
}

/// A record did not fit in the ring buffer: counted (user space turns that into a
/// rescan) and said in the log at 1, 2, 4, 8... losses per CPU, not for every one.
#[inline(always)]
pub(crate) fn lost<C: EbpfContext>(ctx: &C) {
    let n = bump(counter::LOST);
    if n.is_power_of_two() {
        warn!(
            ctx,
            "ring buffer full: {} records lost on this CPU so far", n
        );
    }
}

#[inline(always)]
fn reg(regs: *const u8, offset: usize) -> u64 {
    // SAFETY: reading saved registers through the helper, which checks the address.
    unsafe { bpf_probe_read_kernel(regs.add(offset) as *const u64) }.unwrap_or(0)
}

/// The saved registers from r10 to rdi (x86_64 `pt_regs` order), read in one call.
#[repr(C)]
struct SyscallRegs {
    r10: u64,
    r9: u64,
    r8: u64,
    ax: u64,
    cx: u64,
    dx: u64,
    si: u64,
    di: u64,
}

#[inline(always)]
fn syscall_regs(regs: *const u8) -> SyscallRegs {
    // SAFETY: reading saved registers through the helper, which checks the address.
    unsafe { bpf_probe_read_kernel(regs.add(REG_R10) as *const SyscallRegs) }.unwrap_or(
        SyscallRegs {
            r10: 0,
            r9: 0,
            r8: 0,
            ax: 0,
            cx: 0,
            dx: 0,
            si: 0,
            di: 0,
        },
    )
}

/// What an open of `fd` is tracked as: by its flags, and a directory as a directory
/// whatever its flags (`shutil.rmtree`, `find` and others open directories without
/// O_DIRECTORY, then name files relative to them); 0 for a read-only open of anything
/// else, which makes no record.
#[inline(always)]
fn open_kind(flags: u32, fd: u64) -> u32 {
    if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0 {
        TRACK_WRITE
    } else if flags & O_DIRECTORY != 0 || fd_is_dir(fd) {
        TRACK_DIR
    } else {
        0
    }
}

/// Whether the current task's open file `fd` is a directory (false when unknown).
#[inline(always)]
fn fd_is_dir(fd: u64) -> bool {
    const S_IFMT: u32 = 0o170000;
    const S_IFDIR: u32 = 0o040000;
    let Some(off) = CONFIG.get(0).filter(|off| off.dir_check != 0) else {
        return false;
    };
    fd_file(fd, off)
        .and_then(|file| read_ptr(file, off.f_inode))
        .filter(|&inode| inode != 0)
        .and_then(|inode| read_u32(inode, off.i_mode))
        .is_some_and(|mode| mode & S_IFMT == S_IFDIR)
}

/// fcntl's F_DUPFD and F_DUPFD_CLOEXEC, its only commands that make an fd.
const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

/// Where the path arguments of a syscall are: (dirfd, path) twice, as register values.
struct Args {
    op: u32,
    flags: u32,
    fd1: i32,
    path1: u64,
    fd2: i32,
    path2: u64,
}

impl Args {
    fn path(op: u32, fd1: u64, path1: u64) -> Args {
        Args {
            op,
            flags: 0,
            fd1: fd1 as i32,
            path1,
            fd2: 0,
            path2: 0,
        }
    }
    fn fd(op: u32, fd: u64) -> Args {
        Args::path(op, fd, 0)
    }
    fn flags(mut self, flags: u64) -> Args {
        self.flags = flags as u32;
        self
    }
    fn two(mut self, fd2: u64, path2: u64) -> Args {
        self.fd2 = fd2 as i32;
        self.path2 = path2;
        self
    }
}

const CWD: u64 = AT_FDCWD as i64 as u64;

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn watcher_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    let nr = reg(regs, REG_ORIG_AX);
    // The cheap test first: most syscalls are none of these.
    if !matches!(
        nr,
        nr::OPEN
            | nr::OPENAT
            | nr::OPENAT2
            | nr::CREAT
            | nr::DUP
            | nr::DUP2
            | nr::DUP3
            | nr::FCNTL
            | nr::CLONE
            | nr::CLONE3
            | nr::FORK
            | nr::VFORK
            | nr::CHDIR
            | nr::FCHDIR
            | nr::TRUNCATE
            | nr::FTRUNCATE
            | nr::FALLOCATE
            | nr::RENAME
            | nr::RENAMEAT
            | nr::RENAMEAT2
            | nr::MKDIR
            | nr::MKDIRAT
            | nr::MKNOD
            | nr::MKNODAT
            | nr::RMDIR
            | nr::UNLINK
            | nr::UNLINKAT
            | nr::LINK
            | nr::LINKAT
            | nr::SYMLINK
            | nr::SYMLINKAT
            | nr::CHMOD
            | nr::FCHMOD
            | nr::FCHMODAT
            | nr::FCHMODAT2
            | nr::CHOWN
            | nr::FCHOWN
            | nr::LCHOWN
            | nr::FCHOWNAT
            | nr::UTIME
            | nr::UTIMES
            | nr::FUTIMESAT
            | nr::UTIMENSAT
            | nr::SETXATTR
            | nr::LSETXATTR
            | nr::FSETXATTR
            | nr::REMOVEXATTR
            | nr::LREMOVEXATTR
            | nr::FREMOVEXATTR
            | nr::SETXATTRAT
            | nr::REMOVEXATTRAT
    ) {
        return 0;
    }
    let r = syscall_regs(regs);
    let (di, si, dx, r10, r8) = (r.di, r.si, r.dx, r.r10, r.r8);
    // An open's dirfd, path and flags (struct open_how starts with its u64 flags). Plain
    // values, not an Option: the verifier refuses the undefined payload of a None.
    let (is_open, dirfd, path, flags) = match nr {
        nr::OPEN => (true, CWD, di, si),
        nr::CREAT => (true, CWD, di, (O_CREAT | O_WRONLY | O_TRUNC) as u64),
        nr::OPENAT => (true, di, si, dx),
        // SAFETY: user memory read through the checking helper.
        nr::OPENAT2 => (
            true,
            di,
            si,
            unsafe { bpf_probe_read_user(dx as *const u64) }.unwrap_or(0),
        ),
        _ => (false, 0, 0, 0),
    };
    // The most frequent calls that make no record, let go before any map lookup.
    let open_kind = if is_open {
        open_kind(flags as u32, ret as u64)
    } else {
        0
    };
    if is_open && open_kind == 0 {
        return 0;
    }
    if nr == nr::FCNTL && si != F_DUPFD && si != F_DUPFD_CLOEXEC {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let forked = matches!(nr, nr::CLONE | nr::CLONE3 | nr::FORK | nr::VFORK);
    if forked {
        let flags = match nr {
            nr::CLONE => di,
            // struct clone_args starts with its u64 flags.
            // SAFETY: user memory read through the checking helper.
            nr::CLONE3 => unsafe { bpf_probe_read_user(di as *const u64) }.unwrap_or(0),
            _ => 0,
        };
        // A new thread is no new process.
        if flags & CLONE_THREAD != 0 {
            return 0;
        }
    }
    if ignored(tgid) {
        if forked && ret > 0 {
            let _ = IGNORED.insert(&(ret as u32), &IGNORE_CHILD, 0);
        } else if !forked {
            bump(counter::OWN_DROPPED);
        }
        return 0;
    }
    let args = match nr {
        nr::DUP | nr::DUP2 | nr::DUP3 | nr::FCNTL => {
            if ret as u64 == di {
                return 0;
            }
            let old = ((tgid as u64) << 32) | (di & 0xffff_ffff);
            // SAFETY: a plain lookup; the value is copied at once.
            let kind = (unsafe { TRACKED.get(&old) }).copied();
            let new = ((tgid as u64) << 32) | (ret as u64 & 0xffff_ffff);
            match kind {
                Some(kind) => {
                    let _ = TRACKED.insert(&new, &kind, 0);
                    Args::fd(op::DUP, di).flags(kind as u64)
                }
                // dup2 over a tracked fd closes it.
                None => {
                    // SAFETY: a plain lookup; the value is copied at once.
                    let Some(kind) = (unsafe { TRACKED.get(&new) }).copied() else {
                        return 0;
                    };
                    let _ = TRACKED.remove(&new);
                    Args::fd(op::CLOSE, ret as u64).flags(kind as u64)
                }
            }
        }
        // Reported by the child (ret 0), whose first syscall return this is, so the
        // record comes before any other of the child's; `ret` becomes the parent's tgid.
        nr::CLONE | nr::CLONE3 | nr::FORK | nr::VFORK => {
            if ret != 0 {
                return 0;
            }
            let Some(parent) = parent_tgid() else {
                return 0;
            };
            emit(&ctx, tgid, id as u32, parent as i64, &Args::fd(op::FORK, 0));
            return 0;
        }
        nr::CHDIR => Args::path(op::CHDIR, CWD, di),
        nr::FCHDIR => Args::fd(op::CHDIR, di),
        nr::OPEN | nr::CREAT | nr::OPENAT | nr::OPENAT2 => {
            let kind = open_kind;
            if kind == TRACK_WRITE && fd_outside_roots(&ctx, ret as u64) {
                bump(counter::OUTSIDE_DROPPED);
                return 0;
            }
            let key = ((tgid as u64) << 32) | (ret as u64 & 0xffff_ffff);
            let _ = TRACKED.insert(&key, &kind, 0);
            Args::path(op::OPEN, dirfd, path).flags(flags)
        }
        nr::CLOSE => return 0,
        nr::FTRUNCATE
        | nr::FALLOCATE
        | nr::FCHMOD
        | nr::FCHOWN
        | nr::FSETXATTR
        | nr::FREMOVEXATTR => {
            if fd_outside_roots(&ctx, di) {
                bump(counter::OUTSIDE_DROPPED);
                return 0;
            }
            let (fd_op, vfs_change) = if matches!(nr, nr::FTRUNCATE | nr::FALLOCATE) {
                (op::FD_MODIFY, vfs_op::MODIFY)
            } else {
                (op::FD_ATTRIB, vfs_op::ATTRIB)
            };
            let key = ((tgid as u64) << 32) | (di & 0xffff_ffff);
            // An fd user space never saw opened (read-only, or opened before the probes):
            // reported with the path of its dentry, as the VFS probes report changes.
            // SAFETY: a plain lookup.
            if unsafe { TRACKED.get(&key) }.is_none()
                && let Some(off) = CONFIG.get(0)
                && off.d_name != 0
                && let Some(dentry) = fd_dentry(di, off)
            {
                crate::vfs::report(&ctx, vfs_change, dentry);
                return 0;
            }
            Args::fd(fd_op, di)
        }
        nr::TRUNCATE => Args::path(op::PATH_MODIFY, CWD, di),
        nr::CHMOD | nr::CHOWN | nr::LCHOWN | nr::UTIME | nr::UTIMES => {
            Args::path(op::PATH_ATTRIB, CWD, di)
        }
        nr::SETXATTR | nr::LSETXATTR | nr::REMOVEXATTR | nr::LREMOVEXATTR => {
            Args::path(op::PATH_ATTRIB, CWD, di)
        }
        nr::FCHMODAT | nr::FUTIMESAT => Args::path(op::PATH_ATTRIB, di, si),
        nr::FCHMODAT2 => Args::path(op::PATH_ATTRIB, di, si).flags(r10),
        nr::FCHOWNAT => Args::path(op::PATH_ATTRIB, di, si).flags(r8),
        nr::UTIMENSAT => Args::path(op::PATH_ATTRIB, di, si).flags(r10),
        nr::SETXATTRAT | nr::REMOVEXATTRAT => Args::path(op::PATH_ATTRIB, di, si).flags(dx),
        nr::UNLINK => Args::path(op::UNLINK, CWD, di),
        nr::RMDIR => Args::path(op::UNLINK, CWD, di).flags(AT_REMOVEDIR as u64),
        nr::UNLINKAT => Args::path(op::UNLINK, di, si).flags(dx),
        nr::MKDIR => Args::path(op::MKDIR, CWD, di),
        nr::MKDIRAT => Args::path(op::MKDIR, di, si),
        nr::MKNOD => Args::path(op::MKNOD, CWD, di),
        nr::MKNODAT => Args::path(op::MKNOD, di, si),
        nr::RENAME => Args::path(op::RENAME, CWD, di).two(CWD, si),
        nr::RENAMEAT => Args::path(op::RENAME, di, si).two(dx, r10),
        nr::RENAMEAT2 => Args::path(op::RENAME, di, si).two(dx, r10).flags(r8),
        nr::LINK => Args::path(op::LINK, CWD, di).two(CWD, si),
        nr::LINKAT => Args::path(op::LINK, di, si).two(dx, r10).flags(r8),
        nr::SYMLINK => Args::path(op::SYMLINK, CWD, si),
        nr::SYMLINKAT => Args::path(op::SYMLINK, si, dx),
        _ => return 0,
    };
    emit(&ctx, tgid, id as u32, ret, &args);
    0
}

/// The tgid of the current task's parent, through `task_struct` offsets from BTF.
#[inline(always)]
fn parent_tgid() -> Option<u32> {
    let off = CONFIG.get(0).copied()?;
    if off.real_parent == 0 || off.tgid == 0 {
        return None;
    }
    // SAFETY: kernel memory read through the checking helper, at offsets from BTF.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let parent =
            bpf_probe_read_kernel(task.add(off.real_parent as usize) as *const u64).ok()?;
        let t = bpf_probe_read_kernel((parent as *const u8).add(off.tgid as usize) as *const i32)
            .ok()?;
        Some(t as u32)
    }
}

#[inline(always)]
pub(crate) fn read_ptr(base: u64, offset: u32) -> Option<u64> {
    // SAFETY: kernel memory read through the checking helper, at offsets from BTF.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u64) }.ok()
}

/// A 32-bit field of a kernel struct (a dev_t, a mode, flags).
#[inline(always)]
pub(crate) fn read_u32(base: u64, offset: u32) -> Option<u32> {
    // SAFETY: kernel memory read through the checking helper, at offsets from BTF.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u32) }.ok()
}

/// The `struct file` of the current task's open file `fd`.
#[inline(always)]
fn fd_file(fd: u64, off: &KernelOffsets) -> Option<u64> {
    // SAFETY: returns the current task's address; it is only read through the helper.
    let task = unsafe { bpf_get_current_task() };
    let files = read_ptr(task, off.files)?;
    let fdt = read_ptr(files, off.fdt)?;
    let max_fds = read_u32(fdt, off.fdt_max_fds)?;
    if fd >= max_fds as u64 {
        return None;
    }
    let array = read_ptr(fdt, off.fdt_fd)?;
    read_ptr(array, (fd * 8) as u32).filter(|&file| file != 0)
}

/// The dentry of the current task's open file `fd`.
#[inline(always)]
fn fd_dentry(fd: u64, off: &KernelOffsets) -> Option<u64> {
    let file = fd_file(fd, off)?;
    read_ptr(file, off.f_dentry).filter(|&d| d != 0)
}

/// The dentry of the current task's working directory.
#[inline(always)]
fn cwd_dentry(off: &KernelOffsets) -> Option<u64> {
    // SAFETY: returns the current task's address; it is only read through the helper.
    let task = unsafe { bpf_get_current_task() };
    let fs = read_ptr(task, off.fs)?;
    read_ptr(fs, off.pwd_dentry).filter(|&d| d != 0)
}

/// The filter's configuration, when it is on.
#[inline(always)]
fn filter_config() -> Option<&'static KernelOffsets> {
    CONFIG.get(0).filter(|off| off.filter != 0)
}

/// Whether the file open as `fd` is certainly outside every source root.
#[inline(always)]
fn fd_outside_roots(ctx: &RawTracePointContext, fd: u64) -> bool {
    let Some(off) = filter_config() else {
        return false;
    };
    match fd_dentry(fd, off) {
        Some(d) => outside_roots(d, off),
        None => {
            // The fd was just returned or used by a successful call: the offsets are off.
            debug!(ctx, "filter: fd {} not found in the fd table; reported", fd);
            false
        }
    }
}

/// Whether `dentry` is certainly outside every source root and no directory above one:
/// on a filesystem holding no root, or with no root among its ancestors up to its
/// filesystem's root. Anything unknown (a removed file, a very deep path) counts as inside.
#[inline(always)]
pub(crate) fn outside_roots(dentry: u64, off: &KernelOffsets) -> bool {
    let Some(sb) = read_ptr(dentry, off.d_sb) else {
        return false;
    };
    let Some(dev) = read_u32(sb, off.s_dev) else {
        return false;
    };
    // SAFETY: a plain lookup.
    if unsafe { DEVICES.get(&dev) }.is_none() {
        return true;
    }
    let mut d = dentry;
    for _ in 0..MAX_DEPTH {
        let Some(inode) = read_ptr(d, off.d_inode).filter(|&i| i != 0) else {
            return false;
        };
        let Some(ino) = read_ptr(inode, off.i_ino) else {
            return false;
        };
        let key = RootKey { dev, pad: 0, ino };
        // SAFETY: a plain lookup; the value is copied at once.
        if let Some(kind) = unsafe { ROOTS.get(&key) }.copied()
            && (kind == ROOT || (kind == ROOT_ANCESTOR && d == dentry))
        {
            return false;
        }
        let Some(parent) = read_ptr(d, off.d_parent) else {
            return false;
        };
        if parent == d {
            // The filesystem's root, and no source root on the way.
            return true;
        }
        d = parent;
    }
    false
}

/// Whether a relative path given to a syscall (with `fd` as its directory, or the working
/// directory for AT_FDCWD) certainly names something outside every root: its directory is
/// outside and above none of them, and it has no `..` to climb out (symlinks in it are
/// not followed, as user space does not follow them either). An absolute or empty path,
/// or anything unknown, counts as inside.
#[inline(always)]
fn relative_path_outside(off: &KernelOffsets, fd: i32, path: &[u8; PATH_LEN], len: i32) -> bool {
    if len <= 1 || path[0] == b'/' {
        return false;
    }
    let len = (len as usize).min(PATH_LEN);
    for i in 1..PATH_LEN {
        if i >= len {
            break;
        }
        if path[i] == b'.' && path[i - 1] == b'.' {
            return false;
        }
    }
    let base = if fd == AT_FDCWD {
        cwd_dentry(off)
    } else if fd >= 0 {
        fd_dentry(fd as u64, off)
    } else {
        None
    };
    base.is_some_and(|d| outside_roots(d, off))
}

/// Whether an absolute path given to a syscall certainly names something outside every
/// root and above none: it starts with no root and no root starts with it, compared
/// byte for byte (see [`RootPath`]). A path with an empty name, `.` or `..` in it, or
/// possibly cut short, counts as inside: user space resolves those. The loops over the
/// bytes are `bpf_loop`s, so the verifier checks their bodies once, not per byte.
#[inline(always)]
fn absolute_path_outside(off: &KernelOffsets, path: &[u8; PATH_LEN], len: i32) -> bool {
    if len <= 1 || len as usize >= PATH_LEN || path[0] != b'/' {
        return false;
    }
    let roots = off.root_paths as usize;
    if roots == 0 {
        return false;
    }
    let plen = len as usize - 1;
    let mut scan = Scan {
        path: path.as_ptr(),
        plen: plen as u64,
        root: path.as_ptr(),
        hit: 0,
        related: 0,
    };
    if run_loop(plen, odd_name_at, &mut scan) != 0 || scan.hit != 0 {
        return false;
    }
    run_loop(roots.min(MAX_ROOT_PATHS), related_to_root, &mut scan) == 0 && scan.related == 0
}

/// What the `bpf_loop` callbacks below look at: a record's path, and a root's.
#[repr(C)]
struct Scan {
    /// PATH_LEN bytes, `plen` of them before the NUL.
    path: *const u8,
    plen: u64,
    /// ROOT_PATH_LEN bytes: the root compared with.
    root: *const u8,
    /// Set by the byte callbacks that stopped on what they look for.
    hit: u64,
    /// Set when the path and a root start with one another.
    related: u64,
}

/// Runs `callback` for `0..n` over `scan`; nonzero when the loop could not run.
#[inline(always)]
fn run_loop(n: usize, callback: extern "C" fn(u32, *mut c_void) -> i64, scan: &mut Scan) -> i64 {
    // SAFETY: `scan` lives on the caller's stack frame for the whole loop.
    let done = unsafe {
        bpf_loop(
            n as u32,
            callback as *mut c_void,
            (scan as *mut Scan).cast(),
            0,
        )
    };
    i64::from(done < 0)
}

/// `bpf_loop` callback: compares the path with root `r`; stops the loop when one starts
/// with the other (or the root cannot be read, which keeps the record too).
#[inline(never)]
extern "C" fn related_to_root(r: u32, ctx: *mut c_void) -> i64 {
    let scan = ctx as *mut Scan;
    // SAFETY: `scan` is the caller's, on its stack.
    unsafe {
        let Some(root) = ROOT_PATHS.get(r) else {
            (*scan).related = 1;
            return 1;
        };
        let common = (root.len as usize)
            .min(ROOT_PATH_LEN)
            .min((*scan).plen as usize);
        (*scan).root = root.path.as_ptr();
        (*scan).hit = 0;
        if run_loop(common, differs_at, &mut *scan) != 0 || (*scan).hit == 0 {
            (*scan).related = 1;
            return 1;
        }
    }
    0
}

/// `bpf_loop` callback: stops at byte `i` of the path when a name starts there that is
/// empty (`//`), `.` or `..` (followed by `/` or the path's NUL).
#[inline(never)]
extern "C" fn odd_name_at(i: u32, ctx: *mut c_void) -> i64 {
    let i = i as usize;
    if i >= PATH_LEN - 3 {
        return 1;
    }
    let scan = ctx as *mut Scan;
    // SAFETY: `path` points to a record's PATH_LEN-byte array and i + 3 < PATH_LEN.
    unsafe {
        let p = (*scan).path;
        if *p.add(i) != b'/' {
            return 0;
        }
        let (a, b, c) = (*p.add(i + 1), *p.add(i + 2), *p.add(i + 3));
        if a == b'/' || (a == b'.' && (b == b'/' || b == 0 || (b == b'.' && (c == b'/' || c == 0))))
        {
            (*scan).hit = 1;
            return 1;
        }
    }
    0
}

/// `bpf_loop` callback: stops at byte `i` when the path and the root differ there.
#[inline(never)]
extern "C" fn differs_at(i: u32, ctx: *mut c_void) -> i64 {
    let i = i as usize;
    if i >= ROOT_PATH_LEN {
        return 1;
    }
    let scan = ctx as *mut Scan;
    // SAFETY: `path` has PATH_LEN bytes and `root` ROOT_PATH_LEN, and i < ROOT_PATH_LEN.
    unsafe {
        if *(*scan).path.add(i) != *(*scan).root.add(i) {
            (*scan).hit = 1;
            return 1;
        }
    }
    0
}

/// Whether a path given to a syscall (relative to `fd`) is certainly outside every root.
#[inline(always)]
fn path_outside(off: &KernelOffsets, fd: i32, path: &[u8; PATH_LEN], len: i32) -> bool {
    if path[0] == b'/' {
        absolute_path_outside(off, path, len)
    } else {
        relative_path_outside(off, fd, path, len)
    }
}

/// Whether a path-based record is certainly about names outside every root.
#[inline(always)]
fn record_outside(rec: &Record) -> bool {
    let Some(off) = filter_config() else {
        return false;
    };
    // Read back from the map, not forwarded from the caller's constants, so that the
    // verifier meets the same state here whichever syscall led here, and checks the
    // rest once rather than once per syscall.
    // SAFETY: plain reads of the record's fields.
    let (op, fd1, len1, fd2, len2) = unsafe {
        (
            core::ptr::read_volatile(&rec.op),
            core::ptr::read_volatile(&rec.fd1),
            core::ptr::read_volatile(&rec.len1),
            core::ptr::read_volatile(&rec.fd2),
            core::ptr::read_volatile(&rec.len2),
        )
    };
    let two = match op {
        op::RENAME | op::LINK => true,
        op::UNLINK | op::MKDIR | op::MKNOD | op::SYMLINK | op::PATH_ATTRIB | op::PATH_MODIFY => {
            false
        }
        _ => return false,
    };
    path_outside(off, fd1, &rec.path1, len1) && (!two || path_outside(off, fd2, &rec.path2, len2))
}

/// Whether `tgid` is the daemon or one of its descendants. A child whose parent is
/// ignored is added on its first reportable syscall, which closes the window between a
/// fork and the parent's return from it (the child may run first).
#[inline(always)]
pub(crate) fn ignored(tgid: u32) -> bool {
    // SAFETY: a plain lookup; the value is copied at once.
    if unsafe { IGNORED.get(&tgid) }.is_some() {
        return true;
    }
    let Some(parent_tgid) = parent_tgid() else {
        return false;
    };
    // SAFETY: a plain lookup; the value is copied at once.
    if unsafe { IGNORED.get(&parent_tgid) }.is_some() {
        let _ = IGNORED.insert(&tgid, &IGNORE_CHILD, 0);
        return true;
    }
    false
}

#[inline(always)]
fn emit(ctx: &RawTracePointContext, tgid: u32, pid: u32, ret: i64, args: &Args) {
    let Some(rec) = RECORD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's record slot; user strings are read through the checking helper
    // into its arrays.
    unsafe {
        (*rec).tgid = tgid;
        (*rec).pid = pid;
        (*rec).op = args.op;
        (*rec).flags = args.flags;
        (*rec).ret = ret;
        (*rec).fd1 = args.fd1;
        (*rec).fd2 = args.fd2;
        (*rec).len1 = read_str(args.path1, &mut (*rec).path1);
        (*rec).len2 = read_str(args.path2, &mut (*rec).path2);
        if record_outside(&*rec) {
            bump(counter::OUTSIDE_DROPPED);
            return;
        }
        submit(ctx, rec);
    }
}

/// Copies the record built in `rec` into the ring buffer, sized to its paths: the second
/// path moved right behind the first when both fit in one array (see [`Record`]).
///
/// # Safety
/// `rec` is this CPU's [`RECORD`] slot.
#[inline(always)]
unsafe fn submit(ctx: &RawTracePointContext, rec: *mut Record) {
    let l1 = path_bytes(unsafe { (*rec).len1 });
    let l2 = path_bytes(unsafe { (*rec).len2 });
    let size = if l1 + l2 <= PATH_LEN {
        if l2 > 0 {
            // Within the record: path1 + l1 + l2 ends at most where path2 starts.
            // SAFETY: both ranges lie inside this CPU's record slot and do not overlap.
            let moved = unsafe {
                probe_read_kernel_raw(
                    (*rec).path1.as_mut_ptr().add(l1).cast(),
                    l2 as u32,
                    (*rec).path2.as_ptr().cast(),
                )
            };
            if moved != 0 {
                return;
            }
        }
        RECORD_HEADER + l1 + l2
    } else {
        core::mem::size_of::<Record>()
    };
    // SAFETY: `size` bytes from the start of the record slot are inside it.
    let bytes = unsafe { core::slice::from_raw_parts(rec as *const u8, size) };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        lost(ctx);
        return;
    }
    bump(counter::WRITTEN);
}

#[inline(always)]
fn read_str(ptr: u64, dst: &mut [u8; PATH_LEN]) -> i32 {
    if ptr == 0 {
        dst[0] = 0;
        return 0;
    }
    // SAFETY: user memory read through the checking helper.
    let n = unsafe {
        bpf_probe_read_user_str(dst.as_mut_ptr().cast(), PATH_LEN as u32, ptr as *const _)
    };
    n as i32
}

/// close of a tracked fd, reported at syscall entry: the fd number is still taken then,
/// so the record comes before that of any open that gets the same number from another
/// thread. (close frees the fd even when it fails.)
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn watcher_sys_enter(ctx: RawTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if id as u64 != nr::CLOSE {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let fd = reg(regs, REG_DI);
    let key = ((tgid as u64) << 32) | (fd & 0xffff_ffff);
    // SAFETY: a plain lookup; the value is copied at once.
    let Some(kind) = (unsafe { TRACKED.get(&key) }).copied() else {
        return 0;
    };
    let _ = TRACKED.remove(&key);
    emit(
        &ctx,
        tgid,
        pid_tgid as u32,
        0,
        &Args::fd(op::CLOSE, fd).flags(kind as u64),
    );
    0
}

/// A forked child of the daemon exited: its tgid may be reused by anyone.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn watcher_process_exit(_ctx: RawTracePointContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if tgid == id as u32 {
        // SAFETY: a plain lookup; the value is copied at once.
        if unsafe { IGNORED.get(&tgid) }.copied() == Some(IGNORE_CHILD) {
            let _ = IGNORED.remove(&tgid);
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
