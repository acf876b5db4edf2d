//! The ebpf backend: probes in the kernel (the watcher-ebpf crate, embedded at build time)
//! write a record per change into a ring buffer; this side reads the records and turns
//! them into [`Event`](crate::event::Event)s. The object holds two probe sets, one of
//! which is attached:
//!
//! - the VFS set, fentry/fexit programs on the kernel's VFS functions: it sees every
//!   writer, kernel-internal ones included (nfsd, io_uring, mmap), and names the changed
//!   dentry by its filesystem and its path below that filesystem's root
//!   (`vfs_records`). The kernel must accept fentry programs, which many do not.
//! - the syscall set, raw tracepoints on `sys_enter`, `sys_exit` and
//!   `sched_process_exit`: it sees ordinary processes' path-changing syscalls, with the
//!   path as the caller gave it, resolved here ([`syscall_records`]).
//!
//! [`ProbeChoice::Auto`] tries the VFS set and falls back to the syscall set. Either way
//! the probes read kernel struct fields at offsets taken from the kernel's BTF (`btf`),
//! drop the changes outside every root when the in-kernel filter is on
//! ([`root_filter`]), and drop the syscalls of the daemon and its descendants (a map of
//! ignored tgids: those of [`OwnPids`](super::OwnPids) at start, plus every process an
//! ignored process forks). Records lost to a full ring buffer are counted per CPU in the
//! kernel; any increase is an [`Event::Overflow`](crate::event::Event::Overflow).
//!
//! `loader` loads and attaches the probes, `probe_log` passes the probes' own log lines
//! on; this file holds the options and the running backend.

#[cfg(any(test, feature = "ebpf"))]
mod btf;
#[cfg(feature = "ebpf")]
mod loader;
#[cfg(feature = "ebpf")]
mod probe_log;
pub mod root_filter;
pub mod syscall_records;
#[cfg(any(test, feature = "ebpf"))]
mod vfs_records;

#[cfg(feature = "ebpf")]
pub use loader::check;

// What the running backend needs; nothing of it exists without the probes.
#[cfg(feature = "ebpf")]
use {
    super::mountinfo::{Fence, MountWatch},
    super::read_loop::{self, EventSource, OwnFilter, POLL_INTERVAL},
    super::{Backend, BackendError, OwnPids},
    crate::event::Event,
    aya::Ebpf,
    aya::maps::{MapData, PerCpuArray, RingBuf},
    loader::{ProbeSet, err, load_chosen},
    probe_log::ProbeLog,
    std::os::fd::{AsFd, BorrowedFd},
    std::path::PathBuf,
    std::sync::Arc,
    std::sync::atomic::AtomicBool,
    std::time::{Duration, Instant},
    syscall_records::{Translator, parse_record},
    vfs_records::VfsTranslator,
    watcher_ebpf_common as common,
};

/// Default ring buffer size (a power of two, a multiple of the page size).
pub const DEFAULT_RINGBUF_BYTES: u32 = 16 << 20;

/// Whether this binary holds the eBPF probes (built with the `ebpf` feature).
pub const BUILT: bool = cfg!(feature = "ebpf");

/// Which of the object's probe sets the ebpf backend attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeChoice {
    /// The VFS set where the kernel accepts fentry programs, else the syscall set.
    Auto,
    /// fentry/fexit on VFS functions (sees kernel-internal writers); fail if refused.
    Vfs,
    /// Raw tracepoints on syscalls (ordinary processes only).
    Syscalls,
}

/// The ebpf backend's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfOptions {
    /// Ring buffer size in bytes (see [`EbpfOptions::ringbuf_size`]).
    pub ringbuf_bytes: u32,
    /// Which probe set to attach.
    pub probes: ProbeChoice,
    /// Whether the probes drop changes outside every root in the kernel.
    pub kernel_filter: bool,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        EbpfOptions {
            ringbuf_bytes: DEFAULT_RINGBUF_BYTES,
            probes: ProbeChoice::Auto,
            kernel_filter: true,
        }
    }
}

impl EbpfOptions {
    /// The ring buffer size used: `ringbuf_bytes` rounded up to a power of two of at least
    /// 16 KiB, room for three of the VFS probes' records.
    pub fn ringbuf_size(&self) -> u32 {
        const MIN: u32 = 16 << 10;
        const _: () =
            assert!(3 * std::mem::size_of::<watcher_ebpf_common::VfsRecord>() < MIN as usize);
        self.ringbuf_bytes.max(MIN).next_power_of_two()
    }
}

/// The probes, loaded and attached.
#[cfg(feature = "ebpf")]
pub struct EbpfBackend {
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    /// The probes' own log records, when the object has the map for them.
    probe_log: Option<aya_log::EbpfLogger<ProbeLog>>,
    set: ProbeSet,
    translator: Translator,
    vfs: VfsTranslator,
    own_pids: Arc<OwnPids>,
    lost_seen: u64,
    overflows: u64,
    /// Ring buffer space the records read took: each record's bytes rounded up to 8,
    /// plus the kernel's 8-byte header.
    ring_bytes: u64,
    /// The mount table, followed below the roots: a filesystem mounted later is let
    /// through the in-kernel filter and rescanned, one unmounted rescanned.
    mounts: Option<MountWatch>,
    /// Mount points below `one_file_system` roots: the probes see below them, but their
    /// events are dropped.
    fence: Fence,
}

#[cfg(feature = "ebpf")]
impl EbpfBackend {
    /// Loads and attaches the probes `options` ask for, watching `roots`; the processes
    /// of `own_pids` (and, in the kernel, every process they fork) are not reported.
    /// Mounts below the roots in `stop_at_mounts` are left out.
    pub fn start(
        options: &EbpfOptions,
        roots: &[PathBuf],
        stop_at_mounts: &[PathBuf],
        own_pids: Arc<OwnPids>,
    ) -> Result<Self, BackendError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(BackendError::Ebpf(
                "the probes know x86_64's syscall numbers only".into(),
            ));
        }
        let ringbuf_bytes = options.ringbuf_size();
        let (mut ebpf, set) = load_chosen(options, roots, &own_pids)?;
        let ring = RingBuf::try_from(
            ebpf.take_map(common::MAP_EVENTS)
                .ok_or_else(|| err("eBPF object", "no map EVENTS"))?,
        )
        .map_err(|e| err("map EVENTS", e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(common::MAP_COUNTERS)
                .ok_or_else(|| err("eBPF object", "no map COUNTERS"))?,
        )
        .map_err(|e| err("map COUNTERS", e))?;
        let probe_log = aya_log::EbpfLogger::init_with_logger(&mut ebpf, ProbeLog)
            .map_err(|e| tracing::warn!(error = %e, "the probes' diagnostics are not available"))
            .ok();
        tracing::debug!(ringbuf_bytes, "ebpf probes attached");
        let mut me = EbpfBackend {
            ebpf,
            ring,
            counters,
            probe_log,
            set,
            translator: Translator::new(roots),
            vfs: VfsTranslator::new(roots, Box::new(crate::backend::mountinfo::mounts)),
            own_pids,
            lost_seen: 0,
            overflows: 0,
            ring_bytes: 0,
            mounts: MountWatch::new(roots.to_vec())
                .map_err(|e| tracing::warn!(error = %e, "cannot follow /proc/self/mountinfo: filesystems mounted below a root later are not seen"))
                .ok(),
            fence: Fence::new(stop_at_mounts),
        };
        me.lost_seen = me.counter(common::counter::LOST);
        Ok(me)
    }

    /// Which probe set is attached, for the log.
    pub fn probes(&self) -> &'static str {
        self.set.describe()
    }

    /// The sum over CPUs of counter `index`.
    fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Reads what the ring buffer holds (at most a batch) into events.
    fn drain(&mut self, own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> usize {
        let mut n = 0;
        while n < 4096 {
            let Some(item) = self.ring.next() else {
                break;
            };
            n += 1;
            self.ring_bytes += (item.len() as u64).next_multiple_of(8) + 8;
            if item.len() == std::mem::size_of::<common::VfsRecord>() {
                // SAFETY: the length is checked; VfsRecord is plain old data.
                let rec =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<common::VfsRecord>()) };
                drop(item);
                if own.contains(rec.tgid as i32) {
                    self.translator.stats.own_past_filter += 1;
                    continue;
                }
                self.vfs.translate(&rec, out);
                continue;
            }
            let Some(rec) = parse_record(&item) else {
                continue;
            };
            drop(item);
            if own.contains(rec.tgid as i32) {
                tracing::debug!(
                    op = rec.op,
                    tgid = rec.tgid,
                    "ebpf: own record past the kernel filter"
                );
                self.translator.stats.own_past_filter += 1;
                continue;
            }
            self.translator.translate(&rec, out);
        }
        n
    }

    fn check_lost(&mut self, out: &mut Vec<Event>) {
        let lost = self.counter(common::counter::LOST);
        if lost > self.lost_seen {
            tracing::warn!(
                lost = lost - self.lost_seen,
                "ebpf ring buffer overflow (records lost): queue overflow, rescanning every root"
            );
            self.lost_seen = lost;
            self.overflows += 1;
            self.translator.clear();
            out.push(Event::Overflow);
        }
    }
}

#[cfg(feature = "ebpf")]
impl EventSource for EbpfBackend {
    fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    fn read(&mut self, own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> std::io::Result<usize> {
        let from = out.len();
        let n = self.drain(own, out);
        self.fence.drop_fenced(out, from);
        self.check_lost(out);
        if let Some(log) = self.probe_log.as_mut() {
            log.flush();
        }
        Ok(n)
    }

    /// Lost records show in a counter, not in the ring buffer: it is looked at between
    /// reads too.
    fn tick(&mut self, _now: Instant, out: &mut Vec<Event>) -> Duration {
        if let Some(log) = self.probe_log.as_mut() {
            log.flush();
        }
        self.check_lost(out);
        POLL_INTERVAL
    }

    fn mounts_fd(&self) -> Option<BorrowedFd<'_>> {
        self.mounts.as_ref().map(MountWatch::fd)
    }

    fn mounts_changed(&mut self, out: &mut Vec<Event>) {
        let Some(watch) = &mut self.mounts else {
            return;
        };
        let changes = match watch.changes() {
            Ok(changes) => self.fence.update(&changes),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/self/mountinfo");
                return;
            }
        };
        for m in &changes.gone {
            tracing::info!(mount_point = %m.mount_point.display(), fstype = %m.fstype, "filesystem below a root unmounted: rescanning its mount point");
            out.push(Event::Rescan {
                path: m.mount_point.clone(),
            });
        }
        for m in &changes.appeared {
            tracing::info!(mount_point = %m.mount_point.display(), fstype = %m.fstype, "filesystem mounted below a root: rescanning it");
            if let Err(e) = loader::filter_mount(&mut self.ebpf, &m.mount_point) {
                tracing::warn!(mount_point = %m.mount_point.display(), error = %e, "the in-kernel filter does not know the new mount: later changes there may be missed");
            }
            out.push(Event::Rescan {
                path: m.mount_point.clone(),
            });
        }
    }
}

#[cfg(feature = "ebpf")]
impl Backend for EbpfBackend {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn variant(&self) -> &'static str {
        match self.set {
            ProbeSet::Vfs => "ebpf/vfs",
            ProbeSet::Syscalls => "ebpf/syscalls",
        }
    }

    fn run(
        mut self: Box<Self>,
        sink: &mut dyn FnMut(Vec<Event>) -> bool,
        stop: &AtomicBool,
    ) -> Result<(), BackendError> {
        let own_pids = self.own_pids.clone();
        let result = read_loop::run(&mut *self, &own_pids, sink, stop);
        let s = self.translator.stats;
        let v = self.vfs.stats;
        tracing::info!(
            probes = match self.set {
                ProbeSet::Vfs => "vfs",
                ProbeSet::Syscalls => "syscalls",
            },
            records = s.records + v.records,
            ring_bytes = self.ring_bytes,
            vfs_incomplete_paths = v.incomplete,
            own_dropped_in_kernel = self.counter(common::counter::OWN_DROPPED),
            outside_roots_dropped_in_kernel = self.counter(common::counter::OUTSIDE_DROPPED),
            own_past_kernel_filter = s.own_past_filter,
            foreign = s.foreign,
            unresolved = s.unresolved,
            truncated = s.truncated,
            overflows = self.overflows,
            "ebpf backend stopped"
        );
        result
    }
}

/// Rows for `watcher check`: the probes are not in this binary.
#[cfg(not(feature = "ebpf"))]
pub fn check() -> Vec<super::Support> {
    vec![super::Support {
        backend: "ebpf",
        path: None,
        ok: false,
        detail: "not built into this binary (build watcher-user with --features ebpf; \
                 `cargo xtask test` installs the toolchain and does)"
            .into(),
    }]
}
