//! Dynamic VHD metadata: the 1024-byte dynamic disk header, the block allocation table (BAT),
//! the per-block sector bitmap, and the validated [`DynamicLayout`] built from them.
//!
//! Pure data: no I/O. A `DynamicLayout` exists only if the header checksum is right and the
//! geometry is possible for the real file size: block size a power of two, a table large enough
//! for the virtual size, BAT and header inside the file and clear of each other, every allocated
//! block inside the file and clear of the metadata.

use bytes::{Buf, BufMut};

use super::VhdError;
use super::footer::{FOOTER_LEN, Footer};

pub const HEADER_LEN: usize = 1024;
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const CHECKSUM_AT: usize = 36;
/// BAT entry of a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;
const SECTOR: u64 = 512;
/// Largest block size accepted (the bitmap of a block is kept in one buffer).
const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// The dynamic disk header. Parent fields (used only by differencing disks) are kept as raw
/// bytes so the header round-trips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    /// Bytes 40..1024: parent UUID, timestamp, name, locators, reserved.
    pub parent_fields: Vec<u8>,
}

impl DynamicHeader {
    pub fn parse(buf: &[u8]) -> Result<DynamicHeader, VhdError> {
        if buf.len() < HEADER_LEN {
            return Err(VhdError::HeaderTruncated(buf.len()));
        }
        let buf = &buf[..HEADER_LEN];
        if &buf[..8] != HEADER_COOKIE {
            return Err(VhdError::BadHeaderCookie);
        }
        let mut b = &buf[8..];
        let data_offset = b.get_u64();
        let table_offset = b.get_u64();
        let header_version = b.get_u32();
        let max_table_entries = b.get_u32();
        let block_size = b.get_u32();
        let stored = b.get_u32();
        let computed = super::footer::checksum(buf, CHECKSUM_AT);
        if stored != computed {
            return Err(VhdError::HeaderChecksum { stored, computed });
        }
        Ok(DynamicHeader {
            data_offset,
            table_offset,
            header_version,
            max_table_entries,
            block_size,
            parent_fields: b.to_vec(),
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        {
            let mut b = &mut out[..];
            b.put_slice(HEADER_COOKIE);
            b.put_u64(self.data_offset);
            b.put_u64(self.table_offset);
            b.put_u32(self.header_version);
            b.put_u32(self.max_table_entries);
            b.put_u32(self.block_size);
            b.put_u32(0);
            let n = self.parent_fields.len().min(HEADER_LEN - 40);
            b.put_slice(&self.parent_fields[..n]);
        }
        let sum = super::footer::checksum(&out, CHECKSUM_AT);
        out[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
        out
    }
}

/// Size of a block's sector bitmap: one bit per sector, rounded up to whole sectors.
pub fn bitmap_size(block_size: u32) -> u64 {
    let sectors = (block_size as u64).div_ceil(SECTOR);
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// Bytes the BAT occupies on disk (4 bytes per entry, padded to a sector).
pub fn bat_bytes(entries: u32) -> u64 {
    (entries as u64 * 4).div_ceil(SECTOR) * SECTOR
}

/// Decodes `entries` big-endian BAT entries from `buf` (which must hold them).
pub fn parse_bat(buf: &[u8], entries: u32) -> Result<Vec<u32>, VhdError> {
    let need = entries as usize * 4;
    if buf.len() < need {
        return Err(VhdError::BatTruncated {
            entries,
            have: buf.len(),
        });
    }
    Ok(buf[..need]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Encodes a BAT (inverse of [`parse_bat`]), padded with unallocated entries to a sector.
pub fn encode_bat(bat: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bat_bytes(bat.len() as u32) as usize);
    for e in bat {
        out.put_u32(*e);
    }
    out.resize(bat_bytes(bat.len() as u32) as usize, 0xff);
    out
}

/// Where everything of a dynamic VHD lives, validated against the file size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicLayout {
    pub virtual_size: u64,
    pub block_size: u64,
    pub bitmap_size: u64,
    pub table_offset: u64,
    pub entries: u32,
}

impl DynamicLayout {
    /// Checks the header against the footer and the real file size.
    pub fn new(
        footer: &Footer,
        header: &DynamicHeader,
        file_size: u64,
    ) -> Result<DynamicLayout, VhdError> {
        let content_end = file_size
            .checked_sub(FOOTER_LEN as u64)
            .ok_or(VhdError::FileTooSmall(file_size))?;
        let dyn_header_end = footer.data_offset.checked_add(HEADER_LEN as u64);
        if footer.data_offset < FOOTER_LEN as u64 || dyn_header_end.is_none_or(|e| e > content_end)
        {
            return Err(VhdError::BadDataOffset {
                data_offset: footer.data_offset,
                file_size,
            });
        }
        let bs = header.block_size;
        if !bs.is_power_of_two() || bs < SECTOR as u32 || bs > MAX_BLOCK_SIZE {
            return Err(VhdError::BadBlockSize(bs));
        }
        let virtual_size = footer.virtual_size();
        let capacity = header.max_table_entries as u64 * bs as u64;
        if capacity < virtual_size {
            return Err(VhdError::TableTooSmall {
                entries: header.max_table_entries,
                block_size: bs,
                virtual_size,
            });
        }
        let table_end = header
            .table_offset
            .checked_add(bat_bytes(header.max_table_entries));
        let overlaps_header = header.table_offset < footer.data_offset + HEADER_LEN as u64
            && table_end.is_some_and(|e| e > footer.data_offset);
        if header.table_offset < FOOTER_LEN as u64
            || overlaps_header
            || table_end.is_none_or(|e| e > content_end)
        {
            return Err(VhdError::BatOutOfBounds {
                table_offset: header.table_offset,
                entries: header.max_table_entries,
                file_size,
            });
        }
        Ok(DynamicLayout {
            virtual_size,
            block_size: bs as u64,
            bitmap_size: bitmap_size(bs),
            table_offset: header.table_offset,
            entries: header.max_table_entries,
        })
    }

    /// First byte after the BAT and the header: blocks may not start before this.
    pub fn metadata_end(&self, data_offset: u64) -> u64 {
        let bat_end = self.table_offset + bat_bytes(self.entries);
        bat_end.max(data_offset + HEADER_LEN as u64)
    }

    /// Checks every allocated entry and returns where the next block may be placed (the end
    /// of the last block, or of the metadata), sector-aligned.
    pub fn check_bat(
        &self,
        bat: &[u32],
        data_offset: u64,
        file_size: u64,
    ) -> Result<u64, VhdError> {
        let content_end = file_size.saturating_sub(FOOTER_LEN as u64);
        let meta_end = self.metadata_end(data_offset);
        let mut free = meta_end;
        for (block, &entry) in bat.iter().enumerate() {
            if entry == UNALLOCATED {
                continue;
            }
            let start = entry as u64 * SECTOR;
            let end = start + self.bitmap_size + self.block_size;
            if start < meta_end || end > content_end {
                return Err(VhdError::BlockOutOfBounds {
                    block: block as u32,
                    sector: entry,
                    file_size,
                });
            }
            free = free.max(end);
        }
        Ok(free.div_ceil(SECTOR) * SECTOR)
    }

    /// File offset of the bitmap of a block whose BAT entry is `entry`.
    pub fn bitmap_offset(&self, entry: u32) -> u64 {
        entry as u64 * SECTOR
    }

    /// File offset of byte `in_block` of the data of a block whose BAT entry is `entry`.
    pub fn data_offset(&self, entry: u32, in_block: u64) -> u64 {
        entry as u64 * SECTOR + self.bitmap_size + in_block
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::footer::{DISK_DYNAMIC, Geometry};
    use proptest::prelude::*;

    fn footer(size: u64) -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: 512,
            timestamp: 0,
            creator_app: *b"qem2",
            creator_version: 0,
            creator_os: 0,
            original_size: size,
            current_size: size,
            geometry: Geometry {
                cylinders: 1,
                heads: 1,
                sectors: 1,
            },
            disk_type: DISK_DYNAMIC,
            unique_id: [0; 16],
            saved_state: 0,
        }
    }

    fn header(entries: u32, block_size: u32) -> DynamicHeader {
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            header_version: 0x0001_0000,
            max_table_entries: entries,
            block_size,
            parent_fields: vec![0; HEADER_LEN - 40],
        }
    }

    proptest! {
        #[test]
        fn header_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = DynamicHeader::parse(&bytes);
        }

        #[test]
        fn header_round_trips(data_offset in any::<u64>(), table_offset in any::<u64>(), v in any::<u32>(),
                              entries in any::<u32>(), bs in any::<u32>(),
                              parent in proptest::collection::vec(any::<u8>(), HEADER_LEN - 40..=HEADER_LEN - 40)) {
            let h = DynamicHeader { data_offset, table_offset, header_version: v, max_table_entries: entries, block_size: bs, parent_fields: parent };
            prop_assert_eq!(DynamicHeader::parse(&h.encode()).unwrap(), h);
        }

        #[test]
        fn bat_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), entries in 0u32..100) {
            let _ = parse_bat(&bytes, entries);
        }

        #[test]
        fn bat_round_trips(bat in proptest::collection::vec(any::<u32>(), 0..300)) {
            let enc = encode_bat(&bat);
            prop_assert_eq!(enc.len() as u64 % 512, 0);
            prop_assert_eq!(parse_bat(&enc, bat.len() as u32).unwrap(), bat);
        }

        #[test]
        fn layout_validation_never_panics(entries in any::<u32>(), bs in any::<u32>(), table in any::<u64>(),
                                          data_offset in any::<u64>(), size in any::<u64>(), file_size in any::<u64>()) {
            let mut f = footer(size);
            f.data_offset = data_offset;
            let mut h = header(entries, bs);
            h.table_offset = table;
            if let Ok(l) = DynamicLayout::new(&f, &h, file_size) {
                prop_assert!(l.table_offset + bat_bytes(l.entries) <= file_size - 512);
                prop_assert!(l.entries as u64 * l.block_size >= l.virtual_size);
            }
        }
    }

    #[test]
    fn bitmap_size_matches_qemu() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(32 << 20), 8192);
    }

    #[test]
    fn qemu_layout_is_accepted() {
        // 100 MiB dynamic as qemu lays it out: header @512, BAT @1536 (50 entries -> 512 B).
        let l = DynamicLayout::new(&footer(100 << 20), &header(50, 2 << 20), 2560).unwrap();
        assert_eq!(l.metadata_end(512), 2048);
        assert_eq!(l.check_bat(&[UNALLOCATED; 50], 512, 2560).unwrap(), 2048);
    }

    #[test]
    fn non_power_of_two_block_size_is_refused() {
        let e = DynamicLayout::new(&footer(1 << 20), &header(1, 3 << 20), 4096).unwrap_err();
        assert!(matches!(e, VhdError::BadBlockSize(_)), "{e}");
    }

    #[test]
    fn table_too_small_is_refused() {
        let e = DynamicLayout::new(&footer(100 << 20), &header(49, 2 << 20), 4096).unwrap_err();
        assert!(matches!(e, VhdError::TableTooSmall { .. }), "{e}");
    }

    #[test]
    fn bat_beyond_eof_is_refused() {
        let mut h = header(50, 2 << 20);
        h.table_offset = 1 << 20;
        let e = DynamicLayout::new(&footer(100 << 20), &h, 4096).unwrap_err();
        assert!(matches!(e, VhdError::BatOutOfBounds { .. }), "{e}");
    }

    #[test]
    fn bat_overlapping_the_header_is_refused() {
        let mut h = header(50, 2 << 20);
        h.table_offset = 1024;
        let e = DynamicLayout::new(&footer(100 << 20), &h, 8192).unwrap_err();
        assert!(matches!(e, VhdError::BatOutOfBounds { .. }), "{e}");
    }

    #[test]
    fn wrong_data_offset_is_refused() {
        let mut f = footer(100 << 20);
        f.data_offset = 0;
        let e = DynamicLayout::new(&f, &header(50, 2 << 20), 4096).unwrap_err();
        assert!(matches!(e, VhdError::BadDataOffset { .. }), "{e}");
    }

    #[test]
    fn block_beyond_eof_is_refused() {
        let l = DynamicLayout::new(&footer(100 << 20), &header(50, 2 << 20), 2560).unwrap();
        let mut bat = vec![UNALLOCATED; 50];
        bat[3] = 4;
        let e = l.check_bat(&bat, 512, 2560).unwrap_err();
        assert!(
            matches!(e, VhdError::BlockOutOfBounds { block: 3, .. }),
            "{e}"
        );
    }
}
