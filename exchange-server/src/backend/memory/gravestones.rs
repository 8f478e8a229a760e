//! The gravestones of terminated agents, in memory, at 16 bytes each (plus
//! a table of at most [`OPEN_MAX`] recent ones).
//!
//! Recent ids go to a hash set; when it is full, or a slice of the retention
//! old, it is frozen into a sorted slice of ids. Adjacent slices of similar
//! size merge (as a binary counter does), as long as the merged slice spans
//! at most 1/8 of the retention, so a lookup searches a few slices, and a
//! slice is dropped once its newest gravestone expired.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::retention::SLICES;

/// Most ids in the open set: 7/8 of 65,536, so that a full set keeps the
/// table it has (65,536 slots, about 1.1 MiB).
const OPEN_MAX: usize = 57_344;

#[derive(Debug)]
pub(super) struct Gravestones {
    /// `None`: kept forever.
    ttl: Option<Duration>,
    open: HashSet<u128>,
    opened: Instant,
    /// Oldest first.
    frozen: VecDeque<Frozen>,
}

#[derive(Debug)]
struct Frozen {
    /// Sorted.
    ids: Box<[u128]>,
    /// When its oldest and newest gravestones were laid (at the latest).
    first: Instant,
    last: Instant,
}

impl Gravestones {
    pub(super) fn new(ttl: Option<Duration>) -> Self {
        Self { ttl, open: HashSet::new(), opened: Instant::now(), frozen: VecDeque::new() }
    }

    /// Lays a gravestone for `id`.
    pub(super) fn bury(&mut self, id: u128, now: Instant) {
        if self.open.is_empty() {
            self.opened = now;
        }
        self.open.insert(id);
        if self.open.len() >= OPEN_MAX {
            self.freeze(now);
        }
    }

    /// Whether `id` has a gravestone that has not expired.
    pub(super) fn holds(&self, id: u128, now: Instant) -> bool {
        let alive = |f: &&Frozen| self.ttl.is_none_or(|ttl| f.last + ttl > now);
        self.open.contains(&id)
            || self.frozen.iter().filter(alive).any(|f| f.ids.binary_search(&id).is_ok())
    }

    /// Freezes the open set if it is a slice of the retention old, and drops
    /// the slices whose gravestones all expired; answers how many went.
    pub(super) fn expire(&mut self, now: Instant) -> usize {
        let Some(ttl) = self.ttl else { return 0 };
        if !self.open.is_empty() && now.duration_since(self.opened) >= ttl / SLICES {
            self.freeze(now);
        }
        let mut gone = 0;
        while self.frozen.front().is_some_and(|f| f.last + ttl <= now) {
            gone += self.frozen.pop_front().map_or(0, |f| f.ids.len());
        }
        gone
    }

    /// How many gravestones it holds (expired ones not yet dropped included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len() + self.frozen.iter().map(|f| f.ids.len()).sum::<usize>()
    }

    fn freeze(&mut self, now: Instant) {
        let mut ids: Vec<u128> = self.open.drain().collect();
        ids.sort_unstable();
        let first = self.opened;
        self.frozen.push_back(Frozen { ids: ids.into_boxed_slice(), first, last: now });
        self.opened = now;
        // Merge while the newest slice is as large as the one before it and
        // the two together span at most 1/8 of the retention.
        let most = self.ttl.map(|t| t / 8);
        while let [.., older, newer] = self.frozen.make_contiguous() {
            let span = newer.last.duration_since(older.first);
            if newer.ids.len() < older.ids.len() || most.is_some_and(|most| span > most) {
                break;
            }
            let newer = self.frozen.pop_back().expect("two slices");
            let older = self.frozen.pop_back().expect("two slices");
            self.frozen.push_back(Frozen {
                ids: merged(&older.ids, &newer.ids),
                first: older.first,
                last: newer.last,
            });
        }
    }
}

/// The sorted union of two sorted slices.
fn merged(a: &[u128], b: &[u128]) -> Box<[u128]> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> u128 {
        // Spread like random ids.
        u128::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
    }

    #[test]
    fn holds_what_it_buried_across_freezes_and_merges() {
        let mut g = Gravestones::new(None);
        let now = Instant::now();
        let n = OPEN_MAX as u64 * 5 + 7;
        for i in 0..n {
            g.bury(id(i), now);
        }
        assert_eq!(g.len() as u64, n);
        assert!((0..n).all(|i| g.holds(id(i), now)));
        assert!(!g.holds(id(n), now));
        // 5 frozen slices merge as a binary counter: 4 + 1.
        assert_eq!(g.frozen.len(), 2);
        assert!(g.frozen.iter().all(|f| f.ids.windows(2).all(|w| w[0] < w[1])));
    }

    #[test]
    fn expires_after_the_retention_and_not_before() {
        let ttl = Duration::from_secs(160);
        let mut g = Gravestones::new(Some(ttl));
        let start = Instant::now();
        g.bury(id(1), start);
        // The open set freezes after a slice (10 s).
        assert_eq!(g.expire(start + Duration::from_secs(10)), 0);
        g.bury(id(2), start + Duration::from_secs(30));
        assert!(g.holds(id(1), start + ttl));
        assert_eq!(g.expire(start + ttl), 0, "the slice's newest was laid at 10 s");
        assert!(!g.holds(id(1), start + ttl + Duration::from_secs(10)));
        assert_eq!(g.expire(start + ttl + Duration::from_secs(10)), 1);
        assert!(g.holds(id(2), start + ttl + Duration::from_secs(10)));
        assert_eq!(g.expire(start + ttl * 2), 1);
        assert_eq!(g.len(), 0);
    }

    #[test]
    fn slices_do_not_merge_past_an_eighth_of_the_retention() {
        let ttl = Duration::from_secs(1600);
        let mut g = Gravestones::new(Some(ttl));
        let start = Instant::now();
        for round in 0..40u64 {
            let at = start + Duration::from_secs(round * 100);
            g.bury(id(round), at);
            g.expire(at + Duration::from_secs(100));
        }
        // Each slice spans at most 200 s; those older than the retention went.
        assert!(g.frozen.iter().all(|f| f.last.duration_since(f.first) <= ttl / 8));
        let end = start + Duration::from_secs(4000);
        assert!(g.holds(id(39), end));
        assert!(!g.holds(id(0), end));
    }
}
