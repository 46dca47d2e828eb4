//! Takes the records of several ring buffers (one per CPU) in one order: the
//! order of the stamps they carry.
//!
//! Order matters: a block freed on one CPU and handed out again on another must
//! be seen freed first, or the new block would be dropped with the old one. Each
//! record's stamp is taken after its room in the ring was reserved, from a
//! counter all CPUs add to or from the clock (`ebpf/order.rs`): a record whose
//! program ended before another's began has the lower stamp, and a CPU's records
//! come in its ring in stamp order (each ring has one writer: with rings per
//! CPU, the shared ring gets no records at all). So a ring whose next record
//! shows stamp s will give nothing below s; a ring with nothing more to give
//! when its producer position was read after the drain read the programs'
//! stamp S gives nothing stamped at or below S; a ring stopped at a record still
//! being written may give one stamped as low as the last it gave. Records are
//! taken, lowest stamp first, while no ring may still give a lower one; the rest
//! wait in their rings for the next drain. Two records of one stamp (programs
//! that ran at once, never about one block) go by ring number. Nothing is copied
//! on the way: the records are decoded straight from the ring that holds them.

/// What a ring shows next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A record with this stamp.
    Stamp(u64),
    /// No record: the ring gave every one written before it was looked at.
    End,
    /// A record still being written.
    Busy,
}

/// Takes records from `rings` in (stamp, ring number) order for as long as no
/// ring may still give a lower one. `next` shows what a ring holds next,
/// `take` takes it. `last[i]` is the stamp of the last record taken from ring
/// `i`, kept from drain to drain (a stamp lower than it is taken as it: ring
/// order is kept). `start` is the stamp the programs were at when the drain
/// began, read before any ring's position. Returns whether a ring stopped at a
/// record still being written.
pub fn merge<R>(
    rings: &mut [R],
    last: &mut [u64],
    start: u64,
    mut next: impl FnMut(&mut R) -> Next,
    mut take: impl FnMut(&mut R),
) -> bool {
    let mut heads: Vec<Next> = rings.iter_mut().map(&mut next).collect();
    loop {
        // No ring without a record in view may still give one stamped below
        // `bound`; among those with one, the first and the next after it.
        let mut bound = u64::MAX;
        let mut first = (u64::MAX, usize::MAX);
        let mut second = (u64::MAX, usize::MAX);
        for (i, head) in heads.iter().enumerate() {
            match *head {
                Next::End => bound = bound.min(start),
                Next::Busy => bound = bound.min(last[i]),
                Next::Stamp(t) => {
                    let key = (t.max(last[i]), i);
                    if key < first {
                        second = first;
                        first = key;
                    } else if key < second {
                        second = key;
                    }
                }
            }
        }
        let (mut t, i) = first;
        if i == usize::MAX || t > bound {
            return heads.contains(&Next::Busy);
        }
        // A run from ring `i`: every record before the next ring's head.
        loop {
            take(&mut rings[i]);
            last[i] = t;
            heads[i] = next(&mut rings[i]);
            let Next::Stamp(n) = heads[i] else { break };
            t = n.max(t);
            if t > bound || (t, i) > second {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A ring of (stamp, name) records; when empty it shows `then`.
    struct Fake {
        records: VecDeque<(u64, u64)>,
        then: Next,
    }

    fn ring(records: &[(u64, u64)]) -> Fake {
        Fake {
            records: records.iter().copied().collect(),
            then: Next::End,
        }
    }

    /// One drain that starts at stamp `start`: the names taken, in order, and whether a
    /// ring was busy.
    fn drain(rings: &mut [Fake], last: &mut [u64], start: u64) -> (Vec<u64>, bool) {
        let mut out = Vec::new();
        let busy = merge(
            rings,
            last,
            start,
            |r| r.records.front().map_or(r.then, |&(t, _)| Next::Stamp(t)),
            |r| out.push(r.records.pop_front().expect("a record").1),
        );
        (out, busy)
    }

    #[test]
    fn records_of_two_rings_come_out_in_stamp_order() {
        let mut rings = [ring(&[(10, 1), (30, 3)]), ring(&[(20, 2)])];
        let (out, busy) = drain(&mut rings, &mut [0, 0], 100);
        assert_eq!((out, busy), (vec![1, 2, 3], false));
    }

    #[test]
    fn records_stamped_after_the_start_wait_while_another_ring_may_give_earlier_ones() {
        // Ring 1 is empty: it may still give a record stamped up to 100.
        let mut rings = [ring(&[(10, 1), (150, 3)]), ring(&[])];
        let mut last = [0, 0];
        assert_eq!(drain(&mut rings, &mut last, 100).0, [1]);
        rings[1].records.push_back((120, 2));
        assert_eq!(drain(&mut rings, &mut last, 200).0, [2, 3]);
    }

    #[test]
    fn a_ring_stopped_at_a_record_being_written_holds_the_others_back() {
        let mut rings = [ring(&[(10, 1)]), ring(&[(40, 3)])];
        rings[0].then = Next::Busy;
        let mut last = [0, 0];
        // Ring 0's busy record may be stamped anywhere from 10 on.
        assert_eq!(drain(&mut rings, &mut last, 100), (vec![1], true));
        rings[0].records.push_back((30, 2));
        rings[0].then = Next::End;
        assert_eq!(drain(&mut rings, &mut last, 200), (vec![2, 3], false));
    }

    #[test]
    fn ring_order_is_kept_when_a_stamp_goes_back() {
        let mut rings = [ring(&[(50, 1), (40, 2)]), ring(&[(45, 0)])];
        assert_eq!(drain(&mut rings, &mut [0, 0], 100).0, [0, 1, 2]);
    }

    #[test]
    fn equal_stamps_go_by_ring_number() {
        let mut rings = [ring(&[(5, 0)]), ring(&[(5, 1)]), ring(&[(5, 2)])];
        rings.swap(0, 2);
        // Now ring 0 holds name 2: ring number decides, not the name.
        assert_eq!(drain(&mut rings, &mut [0; 3], 10).0, [2, 1, 0]);
    }

    /// Numbers below `n` from xorshift: the same pseudo-random runs every time.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    /// A record of the model below: reserved at `reserved` in ring `ring`,
    /// stamped just after, readable from `committed` on.
    struct Modelled {
        ring: usize,
        reserved: u64,
        committed: u64,
    }

    #[test]
    fn with_clock_stamps_records_come_out_in_time_order_whatever_the_drains_meet() {
        let mut next_random = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200 {
            let rings = 1 + next_random(5) as usize;
            let mut records: Vec<Modelled> = Vec::new();
            let mut now = 0;
            for _ in 0..300 {
                now += 1 + next_random(10);
                // Most records commit at once, some stay busy a long while.
                let busy = if next_random(10) == 0 {
                    next_random(400)
                } else {
                    next_random(3)
                };
                records.push(Modelled {
                    ring: next_random(rings as u64) as usize,
                    reserved: now,
                    committed: now + 1 + busy,
                });
            }
            // (ring, records taken from it)
            let mut cursors: Vec<(usize, usize)> = (0..rings).map(|r| (r, 0)).collect();
            let mut last = vec![0; rings];
            let mut out = Vec::new();
            let mut drain_at = 0;
            while out.len() < records.len() {
                drain_at += 1 + next_random(200);
                // The records of each ring, in ring order, not taken yet.
                let of_ring = |r: usize, skip: usize| {
                    records
                        .iter()
                        .enumerate()
                        .filter(move |(_, m)| m.ring == r)
                        .nth(skip)
                };
                merge(
                    &mut cursors,
                    &mut last,
                    drain_at,
                    |&mut (r, taken)| match of_ring(r, taken) {
                        Some((_, m)) if m.committed <= drain_at => Next::Stamp(m.reserved + 1),
                        Some((_, m)) if m.reserved <= drain_at => Next::Busy,
                        _ => Next::End,
                    },
                    |(r, taken)| {
                        let (i, _) = of_ring(*r, *taken).expect("a record");
                        out.push(i);
                        *taken += 1;
                    },
                );
            }
            // Records were made in time order: their indexes must come out sorted.
            assert!(out.windows(2).all(|w| w[0] < w[1]), "{out:?}");
        }
    }

    /// A record of the counter model below. Programs act at even instants, the
    /// daemon at odd ones.
    struct Counted {
        ring: usize,
        reserved: u64,
        /// The atomic add to the counter.
        added: u64,
        /// The read of the counter that gives the stamp (after the add).
        read: u64,
        committed: u64,
    }

    #[test]
    fn with_counter_stamps_a_record_comes_out_after_every_one_whose_program_ended_before() {
        // Programs on several CPUs overlap; each reserves, adds to the shared
        // counter, reads it (later adds by other CPUs may show) and commits. A
        // drain reads the counter at D, then each ring's position in turn, 100
        // apart: a whole program may run on one CPU between two of those reads,
        // its record unseen in a ring looked at before while a later record on
        // another CPU is seen.
        let mut next_random = xorshift(0x2545_f491_4f6c_dd1d);
        let even = |t: u64| t + t % 2;
        for _ in 0..300 {
            let rings = 2 + next_random(3) as usize;
            let mut free_at = vec![0u64; rings];
            let mut records: Vec<Counted> = Vec::new();
            for _ in 0..200 {
                let ring = next_random(rings as u64) as usize;
                let reserved = even(free_at[ring] + 2 + next_random(300));
                let added = reserved + 2 + 2 * next_random(3);
                let read = added + 2 * next_random(4);
                // Most records commit at once, some stay busy a long while.
                let busy = if next_random(10) == 0 {
                    next_random(2000)
                } else {
                    next_random(20)
                };
                let committed = even(read + 2 + busy);
                free_at[ring] = committed;
                records.push(Counted {
                    ring,
                    reserved,
                    added,
                    read,
                    committed,
                });
            }
            let counter_at = |t: u64| records.iter().filter(|m| m.added <= t).count() as u64;
            let stamps: Vec<u64> = records.iter().map(|m| counter_at(m.read)).collect();
            // Each ring's records in ring (reservation) order.
            let of_ring: Vec<Vec<usize>> = (0..rings)
                .map(|r| {
                    (0..records.len())
                        .filter(|&i| records[i].ring == r)
                        .collect()
                })
                .collect();
            let mut cursors: Vec<(usize, usize)> = (0..rings).map(|r| (r, 0)).collect();
            let mut last = vec![0; rings];
            let mut out = Vec::new();
            let mut drain_at = 1;
            while out.len() < records.len() {
                drain_at += 200 * (1 + next_random(10));
                let start = counter_at(drain_at);
                let looked = |r: usize| drain_at + 100 * (r as u64 + 1);
                merge(
                    &mut cursors,
                    &mut last,
                    start,
                    |&mut (r, taken)| match of_ring[r].get(taken).map(|&i| (i, &records[i])) {
                        Some((i, m)) if m.committed <= looked(r) => Next::Stamp(stamps[i]),
                        Some((_, m)) if m.reserved <= looked(r) => Next::Busy,
                        _ => Next::End,
                    },
                    |(r, taken)| {
                        out.push(of_ring[*r][*taken]);
                        *taken += 1;
                    },
                );
            }
            let mut place = vec![0; records.len()];
            for (at, &i) in out.iter().enumerate() {
                place[i] = at;
            }
            for (a, ra) in records.iter().enumerate() {
                for (b, rb) in records.iter().enumerate() {
                    if ra.committed < rb.reserved {
                        assert!(place[a] < place[b], "{a} ended before {b} began");
                    }
                }
            }
        }
    }

    #[test]
    fn many_rings_interleave_exactly_over_several_drains() {
        let rings_n = 8u64;
        let mut rings: Vec<Fake> = (0..rings_n).map(|_| ring(&[])).collect();
        let mut last = vec![0; rings_n as usize];
        let mut out = Vec::new();
        // Times 1..=4000 dealt round the rings in a scrambled but per-ring
        // increasing way; each drain sees the records stamped before its start.
        for start in (500..=4500).step_by(500) {
            for t in start - 500..start {
                if t > 0 && t <= 4000 {
                    rings[(t * 7 % rings_n) as usize].records.push_back((t, t));
                }
            }
            out.extend(drain(&mut rings, &mut last, start).0);
        }
        assert_eq!(out, (1..=4000).collect::<Vec<_>>());
    }
}
