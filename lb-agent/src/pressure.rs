//! Conntrack pressure: episodes of LRU eviction, for one WARN per episode.
//!
//! The kernel's conntrack map is an LRU hash: when it is full, a new flow
//! silently evicts the least recently used entry. The GC's recount finds
//! the open flows that vanished that way ([`crate::gc::GcReport::evicted`]).
//! An episode starts at the first sweep that finds an eviction and ends at
//! the first sweep that finds none and sees the map below
//! [`Pressure::END_BELOW_PCT`] of its capacity. Both ends are logged once
//! (WARN, then INFO), each with the running eviction counter, so that a map
//! that stays full logs one line, not one per sweep.

use serde::Serialize;

/// What one sweep changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The first eviction after a calm period.
    Started {
        /// Evictions since the agent started, this sweep's included.
        evicted_total: u64,
        evicted: u64,
    },
    /// No eviction in this sweep and the map below the threshold.
    Ended {
        evicted_total: u64,
        /// Evictions during the episode that ended.
        episode_evicted: u64,
    },
}

/// Episode state, kept across sweeps; also what `/status` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pressure {
    /// Open flows evicted since the agent started.
    pub evicted_total: u64,
    /// Whether an episode is going on.
    pub evicting: bool,
    /// Episodes started since the agent started.
    pub episodes: u64,
    /// Evictions in the current (or last) episode.
    pub episode_evicted: u64,
    /// Map entries and capacity at the last sweep.
    pub entries: u64,
    pub capacity: u64,
}

impl Pressure {
    /// An episode ends once a sweep without evictions sees the map below
    /// this share of its capacity.
    pub const END_BELOW_PCT: u64 = 90;

    /// Takes one sweep's evictions and the map's fill after it.
    pub fn observe(&mut self, evicted: u64, entries: u64, capacity: u64) -> Option<Event> {
        self.evicted_total += evicted;
        self.entries = entries;
        self.capacity = capacity;
        if evicted > 0 {
            self.episode_evicted += evicted;
            if !self.evicting {
                self.evicting = true;
                self.episodes += 1;
                self.episode_evicted = evicted;
                return Some(Event::Started {
                    evicted_total: self.evicted_total,
                    evicted,
                });
            }
            return None;
        }
        if self.evicting && entries * 100 < capacity * Self::END_BELOW_PCT {
            self.evicting = false;
            return Some(Event::Ended {
                evicted_total: self.evicted_total,
                episode_evicted: self.episode_evicted,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_eviction_no_episode() {
        let mut p = Pressure::default();
        for entries in [0, 50, 64, 64, 10] {
            assert_eq!(p.observe(0, entries, 64), None);
        }
        assert_eq!((p.evicting, p.episodes, p.evicted_total), (false, 0, 0));
        assert_eq!((p.entries, p.capacity), (10, 64));
    }

    #[test]
    fn one_event_per_episode_start_and_end() {
        let mut p = Pressure::default();
        assert_eq!(
            p.observe(5, 64, 64),
            Some(Event::Started {
                evicted_total: 5,
                evicted: 5
            })
        );
        // Still evicting, whatever the fill: no new event.
        assert_eq!(p.observe(7, 64, 64), None);
        assert_eq!(p.observe(1, 20, 64), None);
        // Calm but still full: the episode goes on.
        assert_eq!(p.observe(0, 64, 64), None);
        assert_eq!(p.observe(0, 58, 64), None, "58/64 is above 90%");
        assert!(p.evicting);
        assert_eq!(
            p.observe(0, 57, 64),
            Some(Event::Ended {
                evicted_total: 13,
                episode_evicted: 13
            })
        );
        assert!(!p.evicting);
        assert_eq!(p.observe(0, 57, 64), None);
        // A new episode: a new start, its own count, the total carries on.
        assert_eq!(
            p.observe(2, 64, 64),
            Some(Event::Started {
                evicted_total: 15,
                evicted: 2
            })
        );
        assert_eq!(p.episode_evicted, 2);
        assert_eq!(p.episodes, 2);
        assert_eq!(
            p.observe(0, 0, 64),
            Some(Event::Ended {
                evicted_total: 15,
                episode_evicted: 2
            })
        );
    }

    #[test]
    fn a_sweep_with_evictions_never_ends_an_episode() {
        // A tiny LRU map evicts while it looks half empty (per-CPU free
        // lists): the episode must not end and restart every sweep.
        let mut p = Pressure::default();
        assert!(matches!(p.observe(3, 30, 64), Some(Event::Started { .. })));
        for _ in 0..5 {
            assert_eq!(p.observe(3, 30, 64), None);
        }
        assert_eq!(p.episodes, 1);
        assert_eq!(p.episode_evicted, 18);
    }
}
