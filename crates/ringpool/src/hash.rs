//! A fast hasher for integer keys (addresses, tokens) of the driver's and runtime's maps: one
//! multiply instead of SipHash, whose resistance to chosen keys these maps do not need (their
//! keys are ours, not an attacker's).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Fibonacci hashing of one integer key.
#[derive(Default, Clone, Copy)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // The rotation brings the well-mixed high bits down, and the low bits (constant in
        // aligned addresses, sequential in tokens) are mixed into the high ones, which
        // hashbrown's control bytes use.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A `HashMap` with integer keys hashed by [`IntHasher`].
pub(crate) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_keys_spread_over_the_control_bits() {
        // hashbrown takes its 7-bit control tag from the top of the hash: sequential keys
        // must not share it.
        let tags: std::collections::HashSet<u64> = (1..=64u64)
            .map(|k| {
                let mut h = IntHasher::default();
                h.write_u64(k);
                h.finish() >> 57
            })
            .collect();
        assert!(tags.len() > 32, "{} distinct tags", tags.len());
    }

    #[test]
    fn a_map_of_tokens_finds_every_key() {
        let mut m = IntMap::default();
        for k in 0..10_000u64 {
            m.insert(k * 8, k);
        }
        assert!((0..10_000u64).all(|k| m.get(&(k * 8)) == Some(&k)));
    }
}
