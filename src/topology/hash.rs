//! Key → ring position: the one hash every part of shardgate agrees on (SPEC §2).

use xxhash_rust::xxh3::xxh3_64;

/// Position of `key` on the 32-bit ring: the high 32 bits of XXH3-64 with seed 0.
#[inline]
pub fn key_position(key: &[u8]) -> u32 {
    (xxh3_64(key) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_the_high_half_of_xxh3_64() {
        // Reference values from the xxHash project's own XXH3_64bits(seed 0).
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(key_position(b""), 0x2D06_8005);
    }
}
