//! Load balancing: which endpoint of a cluster gets a request.
//!
//! Pure functions over a slice of [`Candidate`]s, so they are tested without sockets:
//! - **least request, power of two choices** (default): two random endpoints, fewer in-flight
//!   requests wins. Nearly as good as a global least-request scan, O(1), and it never herds
//!   every request onto the one endpoint that just became least loaded.
//! - **round robin**: a shared counter; fair when endpoints and requests are uniform.
//! - **consistent hash**: rendezvous (highest random weight) hashing on a request key. Chosen
//!   over a ring because it needs no table, moves only 1/n of keys when an endpoint leaves, and
//!   when the chosen endpoint is down the next-highest score is a stable second choice. It costs
//!   O(n) hashes per request, which is nothing for the endpoint counts of a sidecar.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Balance;

/// What the balancer needs to know about an endpoint.
pub trait Candidate {
    /// Healthy and not ejected.
    fn available(&self) -> bool;
    /// In-flight requests.
    fn load(&self) -> u32;
    /// A stable identity for hashing (from the endpoint's address).
    fn identity(&self) -> u64;
}

/// Picks an endpoint index, or `None` when no endpoint is available.
///
/// `avoid` names an endpoint a retry would rather not reuse; it is still chosen when it is the
/// only one available. `key` is the [`stable_hash`] of the consistent-hash key, when the
/// balance uses one.
pub fn pick<C: Candidate>(
    balance: &Balance,
    endpoints: &[C],
    counter: &AtomicUsize,
    key: Option<u64>,
    avoid: Option<usize>,
) -> Option<usize> {
    let usable = |i: usize| endpoints[i].available() && Some(i) != avoid;
    let chosen = match (balance, key) {
        (Balance::ConsistentHash(_), Some(key)) => rendezvous(endpoints, key, &usable),
        (Balance::RoundRobin, _) => {
            let start = counter.fetch_add(1, Ordering::Relaxed);
            first_usable(endpoints.len(), start, &usable)
        }
        _ => two_choices(endpoints, &usable),
    };
    // The avoided endpoint is better than nothing.
    chosen.or_else(|| avoid.filter(|&i| i < endpoints.len() && endpoints[i].available()))
}

fn first_usable(n: usize, start: usize, usable: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..n).map(|k| (start + k) % n.max(1)).find(|&i| usable(i))
}

fn two_choices<C: Candidate>(endpoints: &[C], usable: &impl Fn(usize) -> bool) -> Option<usize> {
    let n = endpoints.len();
    match n {
        0 => None,
        1 => usable(0).then_some(0),
        _ => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            match (usable(a), usable(b)) {
                (true, true) => Some(if endpoints[b].load() < endpoints[a].load() {
                    b
                } else {
                    a
                }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => first_usable(n, fastrand::usize(..n), usable),
            }
        }
    }
}

fn rendezvous<C: Candidate>(
    endpoints: &[C],
    key_hash: u64,
    usable: &impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..endpoints.len())
        .filter(|&i| usable(i))
        .max_by_key(|&i| mix(key_hash ^ endpoints[i].identity()))
}

/// A hash that is the same in every process and version of attache (std's `DefaultHasher`
/// keys are not promised to stay the same), so that every sidecar sends a key to the same
/// endpoint: FNV-1a, then [`mix`].
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The splitmix64 finaliser: spreads every input bit over the output.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hashes anything hashable with [`stable_hash`]'s guarantees for byte strings.
pub fn identity_of(value: &impl Hash) -> u64 {
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            mix(self.0)
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    value.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashOn;

    struct E {
        up: bool,
        load: u32,
        id: u64,
    }
    impl Candidate for E {
        fn available(&self) -> bool {
            self.up
        }
        fn load(&self) -> u32 {
            self.load
        }
        fn identity(&self) -> u64 {
            self.id
        }
    }

    fn eps(n: usize) -> Vec<E> {
        (0..n)
            .map(|i| E {
                up: true,
                load: 0,
                id: identity_of(&format!("127.0.0.1:{}", 8000 + i)),
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles_and_skips_down() {
        let mut e = eps(3);
        let c = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&Balance::RoundRobin, &e, &c, None, None).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        e[1].up = false;
        let picks: Vec<_> = (0..4)
            .map(|_| pick(&Balance::RoundRobin, &e, &c, None, None).unwrap())
            .collect();
        assert!(!picks.contains(&1));
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let mut e = eps(2);
        e[0].load = 10;
        let c = AtomicUsize::new(0);
        for _ in 0..100 {
            assert_eq!(pick(&Balance::LeastRequest, &e, &c, None, None), Some(1));
        }
    }

    #[test]
    fn least_request_spreads_evenly_when_idle() {
        let e = eps(4);
        let c = AtomicUsize::new(0);
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            counts[pick(&Balance::LeastRequest, &e, &c, None, None).unwrap()] += 1;
        }
        for n in counts {
            assert!((800..1200).contains(&n), "{counts:?}");
        }
    }

    #[test]
    fn nothing_available_is_none_and_avoid_is_a_last_resort() {
        let mut e = eps(2);
        let c = AtomicUsize::new(0);
        assert_eq!(pick(&Balance::LeastRequest, &e, &c, None, Some(0)), Some(1));
        e[1].up = false;
        assert_eq!(pick(&Balance::LeastRequest, &e, &c, None, Some(0)), Some(0));
        e[0].up = false;
        assert_eq!(pick(&Balance::LeastRequest, &e, &c, None, None), None);
        assert_eq!(pick(&Balance::RoundRobin, &e, &c, None, None), None);
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_little() {
        let b = Balance::ConsistentHash(HashOn::Query("user".into()));
        let c = AtomicUsize::new(0);
        let mut e = eps(5);
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: Vec<_> = keys
            .iter()
            .map(|k| pick(&b, &e, &c, Some(stable_hash(k.as_bytes())), None).unwrap())
            .collect();
        let again: Vec<_> = keys
            .iter()
            .map(|k| pick(&b, &e, &c, Some(stable_hash(k.as_bytes())), None).unwrap())
            .collect();
        assert_eq!(before, again);
        e[2].up = false;
        let after: Vec<_> = keys
            .iter()
            .map(|k| pick(&b, &e, &c, Some(stable_hash(k.as_bytes())), None).unwrap())
            .collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Only the keys of the endpoint that left move.
        assert_eq!(moved, before.iter().filter(|&&i| i == 2).count());
        let mut counts = [0u32; 5];
        for i in before {
            counts[i] += 1;
        }
        for n in counts {
            assert!((300..500).contains(&n), "{counts:?}");
        }
    }
}
