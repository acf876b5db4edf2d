//! The capabilities this process holds, as the kernel reports them (`CapEff` in
//! `/proc/self/status`), so `watcher check` says what is really there instead of what a
//! successful call seemed to imply (fanotify_init works unprivileged since Linux 5.13; only
//! filesystem marks need CAP_SYS_ADMIN).

/// Capabilities the backends and rsync need, by number (linux/capability.h).
pub const NEEDED: &[(u32, &str, &str)] = &[
    (
        21,
        "CAP_SYS_ADMIN",
        "fanotify filesystem marks, file handles, the ebpf probes",
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "reading every file of the source, open_by_handle_at",
    ),
    (
        1,
        "CAP_DAC_OVERRIDE",
        "rsync writing a local replica whatever its modes",
    ),
    (0, "CAP_CHOWN", "rsync keeping owners on a local replica"),
    (
        3,
        "CAP_FOWNER",
        "rsync keeping modes and times on a local replica",
    ),
    (39, "CAP_BPF", "loading the ebpf probes (with CAP_PERFMON)"),
    (38, "CAP_PERFMON", "attaching the ebpf probes"),
];

/// A set of capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSet(u64);

impl CapSet {
    /// Whether capability number `cap` is in the set.
    pub fn has(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }
}

/// The `CapEff` line of a `/proc/PID/status` text.
pub fn parse_status(status: &str) -> Option<CapSet> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok().map(CapSet)
}

/// This process's effective capabilities (none when they cannot be read).
pub fn effective() -> CapSet {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status(&s))
        .unwrap_or(CapSet(0))
}

/// One line per needed capability: held or not, and what needs it.
pub fn report(caps: CapSet) -> Vec<String> {
    NEEDED
        .iter()
        .map(|(cap, name, why)| {
            format!(
                "{name:<20} {:<4} {why}",
                if caps.has(*cap) { "yes" } else { "no" }
            )
        })
        .collect()
}

/// Whether CAP_SYS_ADMIN is held (fanotify filesystem marks need it).
pub fn sys_admin() -> bool {
    effective().has(21)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_is_read_from_the_status_text() {
        let root = "Name:\twatcher\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let user = "Name:\twatcher\nCapEff:\t0000000000000000\n";
        let root = parse_status(root).unwrap();
        assert!(root.has(21) && root.has(39) && root.has(0));
        let user = parse_status(user).unwrap();
        assert!(!user.has(21));
        assert_eq!(parse_status("Name: x\n"), None);
        assert_eq!(parse_status("CapEff:\tzz\n"), None);
        let lines = report(parse_status("CapEff:\t0000000000200000\n").unwrap());
        assert!(lines[0].starts_with("CAP_SYS_ADMIN") && lines[0].contains(" yes "));
        assert!(lines[1].starts_with("CAP_DAC_READ_SEARCH") && lines[1].contains(" no "));
    }
}
