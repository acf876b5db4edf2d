//! The process metrics every Prometheus client library exports (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from `/proc/self` when a scrape asks.
//!
//! The parsing is pure (text in, figures out) and tested on captured `/proc` text; only
//! [`ProcessStats::read`] touches the filesystem.

use std::io;

/// What the kernel says about this process, in the units of the Prometheus conventions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Start of the process, seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub open_fds: u64,
    /// The soft limit on open descriptors; `None` when unlimited.
    pub max_fds: Option<u64>,
}

/// The figures of `/proc/self/stat` the metrics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Since boot, in clock ticks.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/PID/stat` (proc(5)): the command name in parentheses may hold spaces and
/// parentheses itself, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; fields are numbered from 1.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit on open files from `/proc/self/limits`: `Some(None)` when unlimited.
fn parse_max_fds(text: &str) -> Option<Option<u64>> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(None)
    } else {
        soft.parse().ok().map(Some)
    }
}

impl ProcessStats {
    /// Reads this process's figures from `/proc`.
    pub fn read() -> io::Result<ProcessStats> {
        let bad =
            |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"));
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat")?)
            .ok_or_else(|| bad("/proc/self/stat"))?;
        let boot_time = parse_boot_time(&std::fs::read_to_string("/proc/stat")?)
            .ok_or_else(|| bad("btime in /proc/stat"))?;
        let max_fds = parse_max_fds(&std::fs::read_to_string("/proc/self/limits")?)
            .ok_or_else(|| bad("/proc/self/limits"))?;
        // The directory listing holds one descriptor of its own while it is read.
        let open_fds = std::fs::read_dir("/proc/self/fd")?
            .count()
            .saturating_sub(1) as u64;
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&t| t > 0)
            .unwrap_or(100) as u64;
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .filter(|&p| p > 0)
            .unwrap_or(4096) as u64;
        Ok(ProcessStats::from_parts(
            stat, boot_time, ticks, page_size, open_fds, max_fds,
        ))
    }

    fn from_parts(
        stat: Stat,
        boot_time: u64,
        ticks_per_second: u64,
        page_size: u64,
        open_fds: u64,
        max_fds: Option<u64>,
    ) -> ProcessStats {
        let ticks = ticks_per_second as f64;
        ProcessStats {
            cpu_seconds: stat.cpu_ticks as f64 / ticks,
            resident_bytes: stat.resident_pages * page_size,
            virtual_bytes: stat.virtual_bytes,
            start_time_seconds: boot_time as f64 + stat.start_ticks as f64 / ticks,
            open_fds,
            max_fds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/stat` of a test process (Linux 6.1), with the name changed below.
    const STAT: &str = "4242 (watcher) S 1 4242 4242 0 -1 4194560 1510 0 0 0 \
        250 75 0 0 20 0 3 0 123456 1234567168 2048 18446744073709551615 1 1 0 0 0 0 0 \
        4096 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let want = Some(Stat {
            cpu_ticks: 325,
            start_ticks: 123_456,
            virtual_bytes: 1_234_567_168,
            resident_pages: 2048,
        });
        for name in [
            "watcher",
            "a b c",
            "x) (y",
            ") 1 2 3 4 5 6 7 8 9 10 11 12 (",
            "",
        ] {
            let text = STAT.replace("(watcher)", &format!("({name})"));
            assert_eq!(parse_stat(&text), want, "name {name:?}");
        }
        for broken in [
            "",
            "4242 watcher S 1",
            "4242 (watcher) S 1 2 3",
            "4242 (w) S x",
        ] {
            assert_eq!(parse_stat(broken), None, "{broken:?}");
        }
    }

    #[test]
    fn boot_time_and_fd_limit() {
        let proc_stat =
            "cpu  1 2 3 4\ncpu0 1 2 3 4\nintr 5 6\nctxt 99\nbtime 1700000000\nprocesses 7\n";
        assert_eq!(parse_boot_time(proc_stat), Some(1_700_000_000));
        assert_eq!(parse_boot_time("cpu 1 2\n"), None);
        assert_eq!(parse_boot_time("btime soon\n"), None);

        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(Some(1024)));
        let unlimited = limits.replace("1024  ", "unlimited");
        assert_eq!(parse_max_fds(&unlimited), Some(None));
        assert_eq!(parse_max_fds("Max cpu time  unlimited\n"), None);
    }

    #[test]
    fn figures_in_prometheus_units() {
        let stat = parse_stat(STAT).unwrap();
        let p = ProcessStats::from_parts(stat, 1_700_000_000, 100, 4096, 12, Some(1024));
        assert_eq!(p.cpu_seconds, 3.25);
        assert_eq!(p.resident_bytes, 2048 * 4096);
        assert_eq!(p.virtual_bytes, 1_234_567_168);
        assert!(
            (p.start_time_seconds - 1_700_001_234.56).abs() < 1e-3,
            "{p:?}"
        );
        assert_eq!((p.open_fds, p.max_fds), (12, Some(1024)));
        let p = ProcessStats::from_parts(stat, 0, 250, 16384, 0, None);
        assert_eq!(p.cpu_seconds, 1.3);
        assert_eq!(p.resident_bytes, 2048 * 16384);
        assert!((p.start_time_seconds - 493.824).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn this_process_reads() {
        let p = ProcessStats::read().unwrap();
        assert!(
            p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes,
            "{p:?}"
        );
        assert!(p.open_fds >= 3, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started in the past, and not before the test binary was built (a day is plenty).
        assert!(
            p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0,
            "{p:?}"
        );
    }
}
