//! The on-LUN superblock: one 4096-byte block at offset 0 that names the volume.
//!
//! Layout (little-endian; every byte not listed is zero when written):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `CSVDLUN1` |
//! | 8 | 4 | format version (u32, [`FORMAT_VERSION`]) |
//! | 12 | 4 | block size (u32) |
//! | 16 | 16 | volume UUID |
//! | 32 | 8 | volume size in bytes (u64) |
//! | 40 | 8 | first data block (u64) |
//! | 48 | 8 | creation time, ms since the Unix epoch (u64) |
//! | 56 | 4 | crc32c of the whole block with this field zeroed |
//!
//! Invariants: `decode` accepts only what `encode` could have produced for a valid
//! superblock (magic, version, checksum, then field sanity, in that order); `format` writes
//! the block with FUA and flushes; a node attaches only if [`Superblock::verify_attach`]
//! passes (right volume UUID, LUN at least as large as the recorded volume).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

use crate::lun::{Lun, LunError};

/// Size of the superblock on the LUN.
pub const SUPERBLOCK_SIZE: usize = 4096;
/// The magic at offset 0.
pub const MAGIC: [u8; 8] = *b"CSVDLUN1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const CRC_AT: usize = 56;

/// The decoded superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub uuid: Uuid,
    pub block_size: u32,
    pub volume_size: u64,
    pub data_start_block: u64,
    pub created_ms: u64,
}

/// Why a superblock was not read, written or accepted.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("superblock truncated: {len} bytes, need {SUPERBLOCK_SIZE}")]
    Truncated { len: usize },
    #[error("not a csvd LUN: magic {found:02x?} is not \"CSVDLUN1\"")]
    NotCsvd { found: [u8; 8] },
    #[error(
        "unsupported superblock format version {found} (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("superblock checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("superblock field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("wrong volume: the LUN holds volume {found}, expected {expected}")]
    WrongVolume { expected: Uuid, found: Uuid },
    #[error(
        "LUN is smaller than its volume: LUN has {lun_size} bytes, superblock records {recorded}"
    )]
    LunTooSmall { lun_size: u64, recorded: u64 },
    #[error("expected volume UUID {value:?} is not a UUID")]
    BadExpectedUuid {
        value: String,
        #[source]
        source: uuid::Error,
    },
    #[error("failed to read the superblock")]
    Read(#[source] LunError),
    #[error("failed to write the superblock")]
    Write(#[source] LunError),
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// crc32c of `block` with the crc field taken as zero.
fn checksum(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..CRC_AT]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &block[CRC_AT + 4..SUPERBLOCK_SIZE])
}

impl Superblock {
    /// A new superblock for a volume of `size` bytes in blocks of `block_size`, with a random
    /// UUID and the current time. [`Superblock::validate`] (and `format`) check the values.
    pub fn new(size: u64, block_size: u32) -> Superblock {
        let created_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Superblock {
            version: FORMAT_VERSION,
            uuid: Uuid::new_v4(),
            block_size,
            volume_size: size,
            data_start_block: (SUPERBLOCK_SIZE as u64)
                .div_ceil(u64::from(block_size.max(1)))
                .max(1),
            created_ms,
        }
    }

    /// The volume UUID in its hyphenated form.
    pub fn uuid_string(&self) -> String {
        self.uuid.hyphenated().to_string()
    }

    /// Checks the fields for consistency.
    pub fn validate(&self) -> Result<(), SuperblockError> {
        let bad = |field, reason: String| Err(SuperblockError::Invalid { field, reason });
        let bs = u64::from(self.block_size);
        if !self.block_size.is_power_of_two() || !(512..=1 << 20).contains(&self.block_size) {
            return bad(
                "block_size",
                format!("{} is not a power of two in 512..=1MiB", self.block_size),
            );
        }
        if self.data_start_block * bs < SUPERBLOCK_SIZE as u64 {
            return bad(
                "data_start_block",
                format!("block {} overlaps the superblock", self.data_start_block),
            );
        }
        if !self.volume_size.is_multiple_of(bs) {
            return bad(
                "volume_size",
                format!(
                    "{} is not a multiple of the block size {bs}",
                    self.volume_size
                ),
            );
        }
        if self.volume_size / bs <= self.data_start_block {
            return bad(
                "volume_size",
                format!("{} leaves no data blocks", self.volume_size),
            );
        }
        Ok(())
    }

    /// The 4096-byte on-LUN form.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..32].copy_from_slice(self.uuid.as_bytes());
        b[32..40].copy_from_slice(&self.volume_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_start_block.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = checksum(&b);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks the on-LUN form (at least 4096 bytes; extra bytes are ignored).
    pub fn decode(bytes: &[u8]) -> Result<Superblock, SuperblockError> {
        if bytes.len() < SUPERBLOCK_SIZE {
            return Err(SuperblockError::Truncated { len: bytes.len() });
        }
        let b = &bytes[..SUPERBLOCK_SIZE];
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return Err(SuperblockError::NotCsvd { found: magic });
        }
        let version = le_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(SuperblockError::UnsupportedVersion { found: version });
        }
        let stored = le_u32(b, CRC_AT);
        let computed = checksum(b);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            version,
            block_size: le_u32(b, 12),
            uuid: Uuid::from_bytes(uuid),
            volume_size: le_u64(b, 32),
            data_start_block: le_u64(b, 40),
            created_ms: le_u64(b, 48),
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Checks that this is the volume the node was told to attach and that the LUN holds it.
    pub fn verify_attach(
        &self,
        expected_uuid: Option<&str>,
        lun_size: u64,
    ) -> Result<(), SuperblockError> {
        if let Some(value) = expected_uuid {
            let expected =
                Uuid::parse_str(value).map_err(|source| SuperblockError::BadExpectedUuid {
                    value: value.to_string(),
                    source,
                })?;
            if expected != self.uuid {
                return Err(SuperblockError::WrongVolume {
                    expected,
                    found: self.uuid,
                });
            }
        }
        if lun_size < self.volume_size {
            return Err(SuperblockError::LunTooSmall {
                lun_size,
                recorded: self.volume_size,
            });
        }
        Ok(())
    }
}

/// Writes `sb` at offset 0 of `lun` (FUA) and flushes.
pub async fn format(lun: &dyn Lun, sb: &Superblock) -> Result<(), SuperblockError> {
    sb.validate()?;
    if lun.size() < sb.volume_size {
        return Err(SuperblockError::LunTooSmall {
            lun_size: lun.size(),
            recorded: sb.volume_size,
        });
    }
    let block = Bytes::copy_from_slice(&sb.encode());
    lun.write_at(0, block, true)
        .await
        .map_err(SuperblockError::Write)?;
    lun.flush().await.map_err(SuperblockError::Write)
}

/// Reads and decodes the superblock at offset 0 of `lun`.
pub async fn read(lun: &dyn Lun) -> Result<Superblock, SuperblockError> {
    let block = lun
        .read_at(0, SUPERBLOCK_SIZE)
        .await
        .map_err(SuperblockError::Read)?;
    Superblock::decode(&block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::MemLun;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn new_superblock_starts_data_after_itself() {
        assert_eq!(Superblock::new(GIB, 4096).data_start_block, 1);
        assert_eq!(Superblock::new(GIB, 512).data_start_block, 8);
        assert_eq!(Superblock::new(GIB, 65536).data_start_block, 1);
        Superblock::new(GIB, 4096).validate().unwrap();
    }

    #[test]
    fn each_failure_has_its_own_variant() {
        let sb = Superblock::new(GIB, 4096);
        let good = sb.encode();

        assert!(matches!(
            Superblock::decode(&good[..100]),
            Err(SuperblockError::Truncated { len: 100 })
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 4096]),
            Err(SuperblockError::NotCsvd { .. })
        ));
        let mut v2 = good;
        v2[8] = 2;
        assert!(matches!(
            Superblock::decode(&v2),
            Err(SuperblockError::UnsupportedVersion { found: 2 })
        ));
        let mut flipped = good;
        flipped[4000] ^= 1;
        assert!(matches!(
            Superblock::decode(&flipped),
            Err(SuperblockError::Checksum { .. })
        ));

        let other = Uuid::new_v4();
        let err = sb.verify_attach(Some(&other.to_string()), GIB).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&other.to_string()) && msg.contains(&sb.uuid_string()),
            "{msg}"
        );
        let err = sb.verify_attach(None, GIB - 4096).unwrap_err();
        assert!(matches!(
            err,
            SuperblockError::LunTooSmall {
                lun_size,
                recorded: GIB
            } if lun_size == GIB - 4096
        ));
        assert!(err.to_string().contains(&GIB.to_string()));
        assert!(matches!(
            sb.verify_attach(Some("not-a-uuid"), GIB),
            Err(SuperblockError::BadExpectedUuid { .. })
        ));
        sb.verify_attach(Some(&sb.uuid_string().to_uppercase()), GIB + 1)
            .unwrap();
    }

    #[test]
    fn invalid_fields_are_rejected_even_with_a_valid_checksum() {
        let mut sb = Superblock::new(GIB, 4096);
        sb.block_size = 3000;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(SuperblockError::Invalid {
                field: "block_size",
                ..
            })
        ));
        let mut sb = Superblock::new(GIB + 512, 4096);
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(SuperblockError::Invalid {
                field: "volume_size",
                ..
            })
        ));
        sb.volume_size = GIB;
        sb.data_start_block = 0;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(SuperblockError::Invalid {
                field: "data_start_block",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn format_then_read_round_trips_through_a_lun_and_survives_a_crash() {
        let lun = MemLun::new(GIB);
        assert!(matches!(
            read(&lun).await,
            Err(SuperblockError::NotCsvd { .. })
        ));
        let sb = Superblock::new(GIB, 4096);
        format(&lun, &sb).await.unwrap();
        lun.crash();
        let back = read(&lun).await.unwrap();
        assert_eq!(back, sb);
        back.verify_attach(Some(&sb.uuid_string()), lun.size())
            .unwrap();
        assert!(matches!(
            format(&lun, &Superblock::new(2 * GIB, 4096)).await,
            Err(SuperblockError::LunTooSmall { .. })
        ));
    }

    fn arb_superblock() -> impl Strategy<Value = Superblock> {
        (9u32..=20, 2u64..1 << 24, any::<[u8; 16]>(), any::<u64>()).prop_map(
            |(shift, blocks, uuid, created_ms)| {
                let block_size = 1u32 << shift;
                let data_start_block = (SUPERBLOCK_SIZE as u64)
                    .div_ceil(u64::from(block_size))
                    .max(1);
                Superblock {
                    version: FORMAT_VERSION,
                    uuid: Uuid::from_bytes(uuid),
                    block_size,
                    volume_size: (blocks + data_start_block) * u64::from(block_size),
                    data_start_block,
                    created_ms,
                }
            },
        )
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&bytes);
            let mut b = bytes.clone();
            if b.len() >= 8 {
                b[..8].copy_from_slice(&MAGIC);
                let _ = Superblock::decode(&b);
            }
        }

        #[test]
        fn encode_decode_round_trips(sb in arb_superblock()) {
            prop_assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        }

        #[test]
        fn any_single_flipped_byte_is_detected(
            sb in arb_superblock(),
            at in 0usize..SUPERBLOCK_SIZE,
            xor in 1u8..=255,
        ) {
            let mut b = sb.encode();
            b[at] ^= xor;
            prop_assert!(Superblock::decode(&b).is_err(), "flip at {} went unnoticed", at);
        }
    }
}
