//! The self-describing block the nbd and fuse workloads write: a header naming the
//! operation that wrote it, and a payload guarded by a crc32c, so that a read alone says
//! which write it returned and whether that write arrived whole.
//!
//! Layout of a [`BLOCK`]-byte block (little endian):
//! `magic[8] = "CSVCHAOS" | op_id u64 | register u64 | crc32c(payload) u32 | 0u32 | payload`.
//! The payload is a pseudo-random stream seeded by the op id.
//!
//! Invariants: [`decode`] never panics on any bytes; an all-zero block is "never written"
//! (op 0); anything else without the magic or with a payload that does not match its
//! crc32c is corrupt.

use super::schedule::SplitMix64;

/// Bytes per block register.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"CSVCHAOS";
const HEADER: usize = 32;

/// What a read found in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The op id in the header (0: never written, or no readable header).
    pub observed: u64,
    /// The payload matches the header's crc32c (true for a never-written block).
    pub crc_ok: bool,
}

/// The block written by operation `op_id` to register `register`, and its payload crc32c.
pub fn encode(op_id: u64, register: u64) -> (Vec<u8>, u32) {
    let mut b = vec![0u8; BLOCK];
    let mut rng = SplitMix64::new(op_id ^ 0xB10C_DA7A);
    for chunk in b[HEADER..].chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&b[HEADER..]);
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&op_id.to_le_bytes());
    b[16..24].copy_from_slice(&register.to_le_bytes());
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    (b, crc)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Reads a block (of any length: a short one is corrupt unless it is all zeros).
pub fn decode(b: &[u8]) -> Decoded {
    if b.iter().all(|x| *x == 0) {
        return Decoded {
            observed: 0,
            crc_ok: true,
        };
    }
    if b.len() != BLOCK || &b[..8] != MAGIC {
        return Decoded {
            observed: 0,
            crc_ok: false,
        };
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[24..28]);
    Decoded {
        observed: u64_at(b, 8),
        crc_ok: u32::from_le_bytes(crc) == crc32c::crc32c(&b[HEADER..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn blank_torn_and_foreign_blocks_are_told_apart() {
        assert_eq!(
            decode(&[0u8; BLOCK]),
            Decoded {
                observed: 0,
                crc_ok: true
            }
        );
        let (mut b, _) = encode(77, 3);
        // A torn block: the second half is an older write's.
        let (old, _) = encode(12, 3);
        b[BLOCK / 2..].copy_from_slice(&old[BLOCK / 2..]);
        assert_eq!(
            decode(&b),
            Decoded {
                observed: 77,
                crc_ok: false
            }
        );
        assert!(!decode(&[0xEE; BLOCK]).crc_ok);
    }

    proptest! {
        #[test]
        fn every_block_round_trips(op in 1u64.., reg in any::<u64>()) {
            let (b, crc) = encode(op, reg);
            prop_assert_eq!(b.len(), BLOCK);
            prop_assert_eq!(crc, crc32c::crc32c(&b[HEADER..]));
            prop_assert_eq!(decode(&b), Decoded { observed: op, crc_ok: true });
        }

        #[test]
        fn random_bytes_never_panic_and_are_never_a_clean_write(
            bytes in proptest::collection::vec(any::<u8>(), 0..BLOCK + 64),
        ) {
            let d = decode(&bytes);
            if bytes.iter().any(|x| *x != 0) && bytes.len() != BLOCK {
                prop_assert!(!d.crc_ok);
            }
        }

        #[test]
        fn one_flipped_bit_is_caught(op in 1u64.., bit in (HEADER * 8)..(BLOCK * 8)) {
            let (mut b, _) = encode(op, 0);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!decode(&b).crc_ok);
        }
    }
}
