//! The writer's allocators: ids for services and backends (they index the
//! per-service and per-backend arrays), and slices of the shared `SLOTS`
//! array for selection tables.

use std::collections::{BTreeMap, VecDeque};

/// Hands out ids; freed ids are reused oldest-first, so an id that conntrack
/// entries may still name is reused as late as possible.
#[derive(Debug)]
pub(super) struct IdAlloc {
    next: u32,
    max: u32,
    free: VecDeque<u32>,
}

impl IdAlloc {
    pub(super) fn new(max: u32) -> Self {
        // Id 0 is never handed out.
        IdAlloc {
            next: 1,
            max,
            free: VecDeque::new(),
        }
    }
    pub(super) fn adopt(&mut self, used: &[u32]) {
        let top = used.iter().copied().max().unwrap_or(0);
        self.next = top + 1;
        let set: std::collections::HashSet<u32> = used.iter().copied().collect();
        self.free = (1..=top).filter(|i| !set.contains(i)).collect();
    }
    pub(super) fn alloc(&mut self) -> Option<u32> {
        if self.next < self.max {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_front()
    }
    pub(super) fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// First-fit allocator of `SLOTS` slices.
#[derive(Debug)]
pub(super) struct RangeAlloc {
    /// offset -> length of free ranges, merged.
    free: BTreeMap<u32, u32>,
}

impl RangeAlloc {
    pub(super) fn new(cap: u32, used: &[(u32, u32)]) -> Self {
        let mut used: Vec<_> = used.iter().copied().filter(|&(_, l)| l > 0).collect();
        used.sort();
        let mut free = BTreeMap::new();
        let mut at = 0u32;
        for (off, len) in used {
            if off > at {
                free.insert(at, off - at);
            }
            at = at.max(off + len);
        }
        if at < cap {
            free.insert(at, cap - at);
        }
        RangeAlloc { free }
    }
    pub(super) fn alloc(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let (&off, &flen) = self.free.iter().find(|&(_, &l)| l >= len)?;
        self.free.remove(&off);
        if flen > len {
            self.free.insert(off + len, flen - len);
        }
        Some(off)
    }
    pub(super) fn release(&mut self, off: u32, len: u32) {
        if len == 0 {
            return;
        }
        let (mut off, mut len) = (off, len);
        if let Some((&p, &pl)) = self.free.range(..off).next_back()
            && p + pl == off
        {
            self.free.remove(&p);
            off = p;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += nl;
        }
        self.free.insert(off, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_alloc_first_fit_and_merge() {
        let mut r = RangeAlloc::new(100, &[(10, 10)]);
        assert_eq!(r.alloc(10), Some(0));
        assert_eq!(r.alloc(5), Some(20));
        assert_eq!(r.alloc(80), None);
        r.release(0, 10);
        r.release(10, 10);
        assert_eq!(r.alloc(20), Some(0));
        r.release(20, 5);
        r.release(0, 20);
        assert_eq!(r.free.len(), 1);
        assert_eq!(r.alloc(100), Some(0));
    }

    #[test]
    fn id_alloc_reuses_oldest_freed_last() {
        let mut a = IdAlloc::new(4);
        assert_eq!(
            (a.alloc(), a.alloc(), a.alloc()),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(a.alloc(), None);
        a.release(2);
        a.release(1);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(2), Some(1), None));
        a.adopt(&[3, 5]);
        assert_eq!(a.next, 6);
        assert_eq!(a.free, VecDeque::from(vec![1, 2, 4]));
    }
}
