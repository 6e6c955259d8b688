//! Boot stage timestamps, handed to the agent as `CAPSEM_BOOT_STAGES`.

use crate::console::boottime_micros;

/// The environment variable the agent reads (`name=micros,name=micros`).
pub const ENV: &str = "CAPSEM_BOOT_STAGES";

/// Stages in the order they were reached, in CLOCK_BOOTTIME microseconds.
#[derive(Debug, Default)]
pub struct BootStages {
    stages: Vec<(&'static str, u64)>,
}

impl BootStages {
    /// Records that `name` finished now.
    pub fn mark(&mut self, name: &'static str) {
        self.mark_at(name, boottime_micros());
    }

    fn mark_at(&mut self, name: &'static str, micros: u64) {
        self.stages.push((name, micros));
    }

    /// The value of [`ENV`].
    pub fn to_env(&self) -> String {
        self.stages
            .iter()
            .map(|(name, micros)| format!("{name}={micros}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_format() {
        let mut s = BootStages::default();
        assert_eq!(s.to_env(), "");
        s.mark_at("init_start", 5);
        s.mark_at("mounts", 17);
        assert_eq!(s.to_env(), "init_start=5,mounts=17");
    }

    #[test]
    fn mark_is_monotonic() {
        let mut s = BootStages::default();
        s.mark("a");
        s.mark("b");
        assert!(s.stages[0].1 <= s.stages[1].1);
    }
}
