//! The probes' diagnostics: aya-log records written in the kernel, passed on to the
//! daemon's `tracing` log at their own level.

/// Passes the probes' aya-log records on to the daemon's log.
pub(super) struct ProbeLog;

impl log::Log for ProbeLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => {
                tracing::error!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
            }
            log::Level::Info => {
                tracing::info!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
            }
            log::Level::Trace => {
                tracing::trace!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
            }
        }
    }

    fn flush(&self) {}
}

/// The most verbose aya-log level the probes write records for: what the daemon's
/// log would show, so nothing is formatted in the kernel only to be thrown away.
pub(super) fn probe_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    let level = match LevelFilter::current() {
        LevelFilter::OFF => return 0,
        LevelFilter::ERROR => aya_log::Level::Error,
        LevelFilter::WARN => aya_log::Level::Warn,
        LevelFilter::INFO => aya_log::Level::Info,
        LevelFilter::DEBUG => aya_log::Level::Debug,
        _ => aya_log::Level::Trace,
    };
    level as u8
}
