//! The 512-byte VHD hard disk footer: parsing, encoding, checksum, and qemu's size rule.
//!
//! Pure data: no I/O. `Footer::parse` accepts only a `conectix` cookie with a matching
//! checksum; `Footer::encode` always writes a correct checksum, so `parse(encode(f)) == f`.
//! All integers are big-endian.

use bytes::{Buf, BufMut};

use super::VhdError;

pub const FOOTER_LEN: usize = 512;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Offset of the checksum field inside the footer.
const CHECKSUM_AT: usize = 64;
/// `data_offset` of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;

pub const DISK_FIXED: u32 = 2;
pub const DISK_DYNAMIC: u32 = 3;
pub const DISK_DIFFERENCING: u32 = 4;

/// The largest CHS geometry; an image carrying it has its size in `current_size` (qemu rule).
const MAX_GEOMETRY: Geometry = Geometry {
    cylinders: 65535,
    heads: 16,
    sectors: 255,
};

/// Cylinders / heads / sectors per track as stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    /// C×H×S×512 bytes.
    pub fn size(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64 * 512
    }
}

/// The hard disk footer, field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

/// One's complement of the byte sum of `buf`, with the 4 checksum bytes at `at` counted as 0.
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(*b as u32));
    !sum
}

impl Footer {
    /// Parses and checksums a footer. `buf` must be at least 512 bytes.
    pub fn parse(buf: &[u8]) -> Result<Footer, VhdError> {
        if buf.len() < FOOTER_LEN {
            return Err(VhdError::FileTooSmall(buf.len() as u64));
        }
        let buf = &buf[..FOOTER_LEN];
        if &buf[..8] != FOOTER_COOKIE {
            return Err(VhdError::BadFooterCookie);
        }
        let mut b = &buf[8..];
        let features = b.get_u32();
        let version = b.get_u32();
        let data_offset = b.get_u64();
        let timestamp = b.get_u32();
        let mut creator_app = [0u8; 4];
        b.copy_to_slice(&mut creator_app);
        let creator_version = b.get_u32();
        let creator_os = b.get_u32();
        let original_size = b.get_u64();
        let current_size = b.get_u64();
        let geometry = Geometry {
            cylinders: b.get_u16(),
            heads: b.get_u8(),
            sectors: b.get_u8(),
        };
        let disk_type = b.get_u32();
        let stored = b.get_u32();
        let mut unique_id = [0u8; 16];
        b.copy_to_slice(&mut unique_id);
        let saved_state = b.get_u8();
        let computed = checksum(buf, CHECKSUM_AT);
        if stored != computed {
            return Err(VhdError::FooterChecksum { stored, computed });
        }
        Ok(Footer {
            features,
            version,
            data_offset,
            timestamp,
            creator_app,
            creator_version,
            creator_os,
            original_size,
            current_size,
            geometry,
            disk_type,
            unique_id,
            saved_state,
        })
    }

    /// Encodes the footer with a correct checksum; reserved bytes are zero.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut out = [0u8; FOOTER_LEN];
        {
            let mut b = &mut out[..];
            b.put_slice(FOOTER_COOKIE);
            b.put_u32(self.features);
            b.put_u32(self.version);
            b.put_u64(self.data_offset);
            b.put_u32(self.timestamp);
            b.put_slice(&self.creator_app);
            b.put_u32(self.creator_version);
            b.put_u32(self.creator_os);
            b.put_u64(self.original_size);
            b.put_u64(self.current_size);
            b.put_u16(self.geometry.cylinders);
            b.put_u8(self.geometry.heads);
            b.put_u8(self.geometry.sectors);
            b.put_u32(self.disk_type);
            b.put_u32(0);
            b.put_slice(&self.unique_id);
            b.put_u8(self.saved_state);
        }
        let sum = checksum(&out, CHECKSUM_AT);
        out[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
        out
    }

    /// The guest-visible size, by qemu's rule: C×H×S×512, unless the creator is known to
    /// store the exact size in `current_size` (Hyper-V `win `, qemu `qem2`, Disk2vhd `d2v `,
    /// XenServer `tap\0`, XenConverter `CTXS`) or the geometry is the maximum.
    pub fn virtual_size(&self) -> u64 {
        let exact_size_creator = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"tap\0" | b"CTXS"
        );
        if exact_size_creator || self.geometry == MAX_GEOMETRY {
            self.current_size
        } else {
            self.geometry.size()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_footer() -> impl Strategy<Value = Footer> {
        (
            (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()),
            (any::<[u8; 4]>(), any::<u32>(), any::<u32>()),
            (any::<u64>(), any::<u64>(), any::<(u16, u8, u8)>()),
            (any::<u32>(), any::<[u8; 16]>(), any::<u8>()),
        )
            .prop_map(|(a, b, c, d)| Footer {
                features: a.0,
                version: a.1,
                data_offset: a.2,
                timestamp: a.3,
                creator_app: b.0,
                creator_version: b.1,
                creator_os: b.2,
                original_size: c.0,
                current_size: c.1,
                geometry: Geometry {
                    cylinders: c.2.0,
                    heads: c.2.1,
                    sectors: c.2.2,
                },
                disk_type: d.0,
                unique_id: d.1,
                saved_state: d.2,
            })
    }

    proptest! {
        #[test]
        fn footer_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Footer::parse(&bytes);
        }

        #[test]
        fn footer_parser_never_panics_with_valid_cookie(mut bytes in proptest::collection::vec(any::<u8>(), 512..513)) {
            bytes[..8].copy_from_slice(FOOTER_COOKIE);
            let _ = Footer::parse(&bytes);
        }

        #[test]
        fn footer_round_trips(f in arb_footer()) {
            let enc = f.encode();
            prop_assert_eq!(Footer::parse(&enc).unwrap(), f);
        }

        #[test]
        fn any_flipped_byte_is_detected(f in arb_footer(), at in 8usize..85, bit in 0u8..8) {
            let mut enc = f.encode();
            enc[at] ^= 1 << bit;
            prop_assert!(Footer::parse(&enc).is_err());
        }
    }

    fn footer(app: &[u8; 4], geometry: Geometry, current_size: u64) -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: NO_DATA_OFFSET,
            timestamp: 0,
            creator_app: *app,
            creator_version: 0,
            creator_os: 0,
            original_size: current_size,
            current_size,
            geometry,
            disk_type: DISK_FIXED,
            unique_id: [0; 16],
            saved_state: 0,
        }
    }

    #[test]
    fn qemu_creator_uses_chs_size() {
        // qemu-img create ... 100M -> C1004/H12/S17.
        let g = Geometry {
            cylinders: 1004,
            heads: 12,
            sectors: 17,
        };
        assert_eq!(footer(b"qemu", g, 1 << 40).virtual_size(), 104_865_792);
        assert_eq!(footer(b"vpc ", g, 1 << 40).virtual_size(), 104_865_792);
    }

    #[test]
    fn hyper_v_and_max_geometry_use_current_size() {
        let g = Geometry {
            cylinders: 1004,
            heads: 12,
            sectors: 17,
        };
        assert_eq!(footer(b"win ", g, 104_857_600).virtual_size(), 104_857_600);
        assert_eq!(footer(b"qem2", g, 104_857_600).virtual_size(), 104_857_600);
        assert_eq!(
            footer(b"qemu", MAX_GEOMETRY, 104_857_600).virtual_size(),
            104_857_600
        );
    }

    #[test]
    fn bad_cookie_is_refused() {
        let mut enc = footer(b"qemu", MAX_GEOMETRY, 512).encode();
        enc[0] = b'X';
        assert!(matches!(
            Footer::parse(&enc),
            Err(VhdError::BadFooterCookie)
        ));
    }
}
