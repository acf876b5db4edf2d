//! The daemon's counters: they belong to the daemon, not to one configuration, so a reload
//! keeps them.

use super::*;

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Stats {
    pub(super) fn target(&self, settings: &Settings) -> Option<&TargetStats> {
        self.targets.get(&settings.group_name)?.get(&settings.name)
    }

    pub(super) fn target_mut(&mut self, settings: &Settings) -> &mut TargetStats {
        self.targets
            .entry(settings.group_name.clone())
            .or_default()
            .entry(settings.name.clone())
            .or_default()
    }
}
