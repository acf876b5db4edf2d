//! What systemd hears (`sd_notify(3)`, for `Type=notify` units): `READY=1` as soon as
//! change capture is armed, so `systemctl start` returns in about a second on any tree,
//! then one `STATUS=` line whenever the targets' standing changes: the initial sync's
//! progress, "in step", the targets retrying or given up. `systemctl status watcher` shows
//! the last one.

/// Sends `states` to systemd; nothing when not started by it (no `NOTIFY_SOCKET`), the
/// normal case outside a service.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

/// One target, as the status line sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// How the line names it.
    pub label: String,
    /// Its first whole-tree sync since start completed (or none was needed).
    pub in_step: bool,
    /// Its last flush failed and it is being retried.
    pub retrying: bool,
    /// It is no longer synced.
    pub failed: bool,
}

/// The `STATUS=` text for the targets' standings: "initial sync: 2 of 3 targets in step",
/// "in step", "target b retrying", joined with "; ".
pub fn status_text(targets: &[Standing]) -> String {
    let mut parts = Vec::new();
    let in_step = targets.iter().filter(|t| t.in_step).count();
    if in_step < targets.len() {
        let noun = if targets.len() == 1 {
            "target"
        } else {
            "targets"
        };
        parts.push(format!(
            "initial sync: {in_step} of {} {noun} in step",
            targets.len()
        ));
    }
    for t in targets {
        if t.failed {
            parts.push(format!("target {} failed", t.label));
        } else if t.retrying {
            parts.push(format!("target {} retrying", t.label));
        }
    }
    if parts.is_empty() {
        return "in step".into();
    }
    parts.join("; ")
}

/// Sends a `STATUS=` line when it differs from the last one sent.
#[derive(Debug, Default)]
pub struct StatusLine {
    last: Option<String>,
}

impl StatusLine {
    /// Sends `text` unless it was the last line sent; returns whether it sent.
    pub fn update(&mut self, text: String) -> bool {
        if self.last.as_deref() == Some(text.as_str()) {
            return false;
        }
        notify(&[sd_notify::NotifyState::Status(&text)]);
        self.last = Some(text);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(label: &str, in_step: bool, retrying: bool, failed: bool) -> Standing {
        Standing {
            label: label.into(),
            in_step,
            retrying,
            failed,
        }
    }

    #[test]
    fn status_lines() {
        let table: &[(&[Standing], &str)] = &[
            (&[t("a", true, false, false)], "in step"),
            (
                &[t("a", false, false, false)],
                "initial sync: 0 of 1 target in step",
            ),
            (
                &[
                    t("a", true, false, false),
                    t("b", true, false, false),
                    t("c", false, false, false),
                ],
                "initial sync: 2 of 3 targets in step",
            ),
            (
                &[t("a", true, false, false), t("b", false, true, false)],
                "initial sync: 1 of 2 targets in step; target b retrying",
            ),
            (
                &[t("a", true, true, false), t("b", true, false, true)],
                "target a retrying; target b failed",
            ),
            (&[], "in step"),
        ];
        for (targets, want) in table {
            assert_eq!(status_text(targets), *want, "{targets:?}");
        }
    }

    #[test]
    fn a_status_line_is_sent_once() {
        let mut line = StatusLine::default();
        assert!(line.update("in step".into()));
        assert!(!line.update("in step".into()));
        assert!(line.update("target a retrying".into()));
    }
}
