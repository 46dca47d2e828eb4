//! A set of disjoint address ranges, used for the memory an allocator owns.

use std::{collections::BTreeMap, ops::Range};

/// Disjoint, non-adjacent half-open ranges, merged on insert.
#[derive(Clone, Debug, Default)]
pub struct RangeSet {
    /// start -> end
    ranges: BTreeMap<u64, u64>,
    /// A range of the set (start, end) that the last insert fell in or made:
    /// most inserts of freed blocks land in memory freed before, often the same
    /// range, and are answered without a lookup.
    last: Option<(u64, u64)>,
}

impl PartialEq for RangeSet {
    fn eq(&self, other: &Self) -> bool {
        self.ranges == other.ranges
    }
}

impl Eq for RangeSet {}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `r`, merging it with every range it touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        if self.last.is_some_and(|(s, e)| s <= r.start && r.end <= e) {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // A range starting at or before `start` that reaches it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            if e >= end {
                self.last = Some((s, e));
                return; // already covered: the common case, one lookup
            }
            start = s;
            end = end.max(e);
            self.ranges.remove(&s);
        }
        // Ranges starting inside [start, end].
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
        self.last = Some((start, end));
    }

    /// Removes `r`, splitting ranges that straddle its ends.
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        self.last = None;
        let touched: Vec<(u64, u64)> = self
            .overlapping(r.clone())
            .map(|x| (x.start, x.end))
            .collect();
        for (s, e) in touched {
            self.ranges.remove(&s);
            if s < r.start {
                self.ranges.insert(s, r.start);
            }
            if e > r.end {
                self.ranges.insert(r.end, e);
            }
        }
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.ranges
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, &e)| addr < e)
    }

    /// The ranges that overlap `r`, in address order.
    pub fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = self
            .ranges
            .range(..=r.start)
            .next_back()
            .filter(|(_, e)| **e > r.start)
            .map(|(&s, &e)| s..e);
        let rest = self
            .ranges
            .range(r.start.saturating_add(1)..r.end)
            .map(|(&s, &e)| s..e);
        first.into_iter().chain(rest)
    }

    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &RangeSet) -> Vec<Range<u64>> {
        s.iter().collect()
    }

    #[test]
    fn inserts_merge_touching_ranges() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(all(&s), vec![10..20, 30..40]);
        s.insert(20..30);
        assert_eq!(all(&s), vec![10..40]);
        s.insert(5..12);
        s.insert(35..50);
        assert_eq!(all(&s), vec![5..50]);
        s.insert(60..70);
        s.insert(0..100);
        assert_eq!(all(&s), vec![0..100]);
    }

    #[test]
    fn an_insert_inside_the_last_range_changes_nothing_until_a_remove() {
        let mut s = RangeSet::new();
        s.insert(0..100);
        s.insert(10..20);
        s.insert(0..100);
        assert_eq!(all(&s), vec![0..100]);
        s.remove(10..20);
        s.insert(12..14);
        assert_eq!(all(&s), vec![0..10, 12..14, 20..100]);
        s.insert(14..20);
        s.insert(10..12);
        assert_eq!(all(&s), vec![0..100]);
        // A range merged from others is what the next insert is checked against.
        s.insert(200..300);
        s.insert(100..200);
        s.insert(150..250);
        assert_eq!(all(&s), vec![0..300]);
    }

    #[test]
    fn removes_split_ranges() {
        let mut s = RangeSet::new();
        s.insert(0..100);
        s.remove(40..60);
        assert_eq!(all(&s), vec![0..40, 60..100]);
        s.remove(30..70);
        assert_eq!(all(&s), vec![0..30, 70..100]);
        s.remove(0..200);
        assert!(s.is_empty());
    }

    #[test]
    fn answers_membership_and_overlap() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        assert!(!s.contains(9));
        assert!(s.contains(10));
        assert!(!s.contains(20));
        assert_eq!(
            s.overlapping(15..35).collect::<Vec<_>>(),
            vec![10..20, 30..40]
        );
        assert_eq!(s.overlapping(20..30).count(), 0);
    }
}
