//! One backend's health: consecutive results against the thresholds.

/// A backend's health as its checks have found it. A backend starts healthy
/// (it came from the desired state as ready); `unhealthy_threshold` failures
/// in a row take it out, `healthy_threshold` passes in a row put it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            healthy: true,
            streak: 0,
        }
    }
}

impl Tracker {
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new state when it changed.
    pub fn record(&mut self, passed: bool, unhealthy: u32, healthy: u32) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { unhealthy } else { healthy };
        if self.streak >= needed.max(1) {
            self.healthy = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs results through a tracker; the state after each.
    fn run(t: &mut Tracker, results: &str, unhealthy: u32, healthy: u32) -> String {
        results
            .chars()
            .map(|c| {
                t.record(c == '+', unhealthy, healthy);
                if t.healthy() { 'H' } else { 'U' }
            })
            .collect()
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut t = Tracker::default();
        assert!(t.healthy());
        // 3 to go down: two failures and a pass reset the count.
        assert_eq!(run(&mut t, "--+---", 3, 2), "HHHHHU");
        // 2 to come back: a failure in between resets it.
        assert_eq!(run(&mut t, "+-++", 3, 2), "UUUH");
        // Passes while healthy and failures while unhealthy change nothing.
        assert_eq!(run(&mut t, "+++", 3, 2), "HHH");
    }

    #[test]
    fn transitions_are_reported_once() {
        let mut t = Tracker::default();
        assert_eq!(t.record(false, 1, 1), Some(false));
        assert_eq!(t.record(false, 1, 1), None);
        assert_eq!(t.record(true, 1, 1), Some(true));
        assert_eq!(t.record(true, 1, 1), None);
        // A threshold of 0 (never valid) acts as 1.
        assert_eq!(t.record(false, 0, 0), Some(false));
    }
}
