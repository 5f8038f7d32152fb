//! VHD (Microsoft Virtual Hard Disk v1.0) served decoded: the client sees the virtual disk.
//!
//! `footer` and `dynamic` parse and validate metadata (no I/O); this module reads it from a
//! [`BackingFile`] and builds the device:
//! * fixed VHD: a [`RawDevice`] over the data region `[0, virtual_size)`; the footer is never
//!   reachable by the client;
//! * dynamic VHD: [`DynamicVhd`]. Unallocated blocks read as zeros (sent as holes) and report
//!   `HOLE|ZERO`. The first write to a block allocates it in qemu's crash-safe order, each step
//!   flushed before the next: sector bitmap at the old end of the data area, footer at the new
//!   end of file, then the BAT entry. A crash before the BAT entry only leaks space. Allocation
//!   is serialised per device (and the device is shared by all connections to the export).
//! * differencing VHDs are refused (a parent chain is not supported).
//!
//! Like qemu, reads ignore the sector bitmap of allocated blocks; on the first write to an
//! allocated block in this session a bitmap that is not all ones is set to all ones, so
//! bitmap-honouring readers see what we wrote.

pub mod dynamic;
pub mod footer;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use thiserror::Error;

use crate::export::{
    BackingFile, BlockDevice, BoxFuture, DeviceError, Extent, RawDevice, ReadChunk, ZeroMode,
    zero_range,
};
use crate::proto::{STATE_HOLE, STATE_ZERO};
use dynamic::{DynamicHeader, DynamicLayout, UNALLOCATED};
use footer::{DISK_DIFFERENCING, DISK_DYNAMIC, DISK_FIXED, FOOTER_LEN, Footer, NO_DATA_OFFSET};

/// A file is not a VHD this module can serve.
#[derive(Debug, Error)]
pub enum VhdError {
    #[error("file of {0} bytes is too small to be a VHD")]
    FileTooSmall(u64),
    #[error("no VHD footer (cookie \"conectix\" missing)")]
    BadFooterCookie,
    #[error("bad VHD footer checksum: stored {stored:#010x}, computed {computed:#010x}")]
    FooterChecksum { stored: u32, computed: u32 },
    #[error("unsupported VHD format version {0:#010x}")]
    BadVersion(u32),
    #[error("differencing VHDs are not supported (the parent chain cannot be followed)")]
    Differencing,
    #[error("unsupported VHD disk type {0}")]
    BadDiskType(u32),
    #[error("fixed VHD declares {virtual_size} bytes but holds only {data_bytes}")]
    FixedTooSmall { virtual_size: u64, data_bytes: u64 },
    #[error("fixed VHD has a data offset {0:#x} (must be all ones)")]
    FixedDataOffset(u64),
    #[error("dynamic header truncated: {0} bytes")]
    HeaderTruncated(usize),
    #[error("no dynamic disk header (cookie \"cxsparse\" missing)")]
    BadHeaderCookie,
    #[error("bad dynamic header checksum: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("dynamic header offset {data_offset} is impossible in a {file_size}-byte file")]
    BadDataOffset { data_offset: u64, file_size: u64 },
    #[error("block size {0} is not a power of two between 512 B and 256 MiB")]
    BadBlockSize(u32),
    #[error(
        "block table of {entries} entries of {block_size} bytes is too small for {virtual_size} bytes"
    )]
    TableTooSmall {
        entries: u32,
        block_size: u32,
        virtual_size: u64,
    },
    #[error(
        "block table at {table_offset} ({entries} entries) lies outside the {file_size}-byte file or overlaps metadata"
    )]
    BatOutOfBounds {
        table_offset: u64,
        entries: u32,
        file_size: u64,
    },
    #[error("block table truncated: {entries} entries need more than {have} bytes")]
    BatTruncated { entries: u32, have: usize },
    #[error(
        "block {block} at sector {sector} lies beyond the end of the {file_size}-byte file or overlaps metadata"
    )]
    BlockOutOfBounds {
        block: u32,
        sector: u32,
        file_size: u64,
    },
    #[error("reading VHD metadata failed")]
    Io(#[source] io::Error),
}

/// Reads and validates a VHD and returns the decoded device.
pub async fn open(
    backing: Arc<dyn BackingFile>,
    read_only: bool,
) -> Result<Arc<dyn BlockDevice>, VhdError> {
    let file_size = backing.size();
    if file_size < FOOTER_LEN as u64 {
        return Err(VhdError::FileTooSmall(file_size));
    }
    let footer = read_footer(backing.as_ref(), file_size).await?;
    if footer.version >> 16 != 1 {
        return Err(VhdError::BadVersion(footer.version));
    }
    match footer.disk_type {
        DISK_FIXED => {
            if footer.data_offset != NO_DATA_OFFSET {
                return Err(VhdError::FixedDataOffset(footer.data_offset));
            }
            let virtual_size = footer.virtual_size();
            let data_bytes = file_size - FOOTER_LEN as u64;
            if virtual_size > data_bytes {
                return Err(VhdError::FixedTooSmall {
                    virtual_size,
                    data_bytes,
                });
            }
            Ok(Arc::new(RawDevice::new(backing, virtual_size, read_only)))
        }
        DISK_DYNAMIC => Ok(Arc::new(
            DynamicVhd::open(backing, footer, file_size, read_only).await?,
        )),
        DISK_DIFFERENCING => Err(VhdError::Differencing),
        other => Err(VhdError::BadDiskType(other)),
    }
}

/// The footer at EOF, unless it is a dynamic disk whose copy at offset 0 is valid (qemu reads
/// that copy first; it also survives a crash in the middle of a block allocation, when the old
/// EOF footer has been overwritten by the new block's bitmap).
async fn read_footer(backing: &dyn BackingFile, file_size: u64) -> Result<Footer, VhdError> {
    let tail = backing
        .read_at(file_size - FOOTER_LEN as u64, FOOTER_LEN)
        .await
        .map_err(VhdError::Io)?;
    let at_end = Footer::parse(&tail);
    if let Ok(f) = &at_end
        && f.disk_type == DISK_FIXED
    {
        return at_end;
    }
    let head = backing.read_at(0, FOOTER_LEN).await.map_err(VhdError::Io)?;
    match Footer::parse(&head) {
        Ok(copy) if copy.disk_type != DISK_FIXED => Ok(copy),
        _ => at_end,
    }
}

/// A dynamic VHD: sparse blocks located through the BAT.
pub struct DynamicVhd {
    backing: Arc<dyn BackingFile>,
    footer: Footer,
    layout: DynamicLayout,
    read_only: bool,
    /// In-memory BAT; an entry changes only under `alloc`, after it is durable on disk.
    bat: RwLock<Vec<u32>>,
    /// Blocks whose bitmap is known to be all ones in this session.
    bitmap_full: Vec<AtomicBool>,
    /// Serialises allocation; holds where the next block's bitmap goes.
    alloc: tokio::sync::Mutex<u64>,
}

/// The part of a request that falls into one block.
struct Segment {
    block: usize,
    /// Offset in the virtual disk.
    offset: u64,
    in_block: u64,
    len: u64,
}

impl DynamicVhd {
    async fn open(
        backing: Arc<dyn BackingFile>,
        footer: Footer,
        file_size: u64,
        read_only: bool,
    ) -> Result<DynamicVhd, VhdError> {
        let data_offset = footer.data_offset;
        // Bounds are checked by DynamicLayout::new before anything is trusted; read the header
        // only if it can be in the file at all.
        if data_offset
            .checked_add(dynamic::HEADER_LEN as u64)
            .is_none_or(|e| e > file_size)
        {
            return Err(VhdError::BadDataOffset {
                data_offset,
                file_size,
            });
        }
        let hbuf = backing
            .read_at(data_offset, dynamic::HEADER_LEN)
            .await
            .map_err(VhdError::Io)?;
        let header = DynamicHeader::parse(&hbuf)?;
        let layout = DynamicLayout::new(&footer, &header, file_size)?;
        let bat_buf = backing
            .read_at(layout.table_offset, layout.entries as usize * 4)
            .await
            .map_err(VhdError::Io)?;
        let bat = dynamic::parse_bat(&bat_buf, layout.entries)?;
        let checked_free = layout.check_bat(&bat, data_offset, file_size)?;
        // Never place a block before the current footer: a file longer than its BAT says
        // (space leaked by a crash) keeps its footer at EOF this way.
        let eof_footer = (file_size - FOOTER_LEN as u64).div_ceil(512) * 512;
        let next_block = checked_free.max(eof_footer);
        let bitmap_full = (0..layout.entries)
            .map(|_| AtomicBool::new(false))
            .collect();
        Ok(DynamicVhd {
            backing,
            footer,
            layout,
            read_only,
            bat: RwLock::new(bat),
            bitmap_full,
            alloc: tokio::sync::Mutex::new(next_block),
        })
    }

    fn entry(&self, block: usize) -> u32 {
        match self.bat.read() {
            Ok(bat) => bat.get(block).copied().unwrap_or(UNALLOCATED),
            Err(poisoned) => poisoned
                .into_inner()
                .get(block)
                .copied()
                .unwrap_or(UNALLOCATED),
        }
    }

    fn segments(&self, offset: u64, len: u64) -> impl Iterator<Item = Segment> + '_ {
        let bs = self.layout.block_size;
        let end = offset.saturating_add(len);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let in_block = pos % bs;
            let seg = Segment {
                block: (pos / bs) as usize,
                offset: pos,
                in_block,
                len: (bs - in_block).min(end - pos),
            };
            pos += seg.len;
            Some(seg)
        })
    }

    fn writable(&self) -> Result<(), DeviceError> {
        if self.read_only {
            Err(DeviceError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Returns the block's BAT entry, allocating the block first if needed.
    async fn allocate(&self, block: usize) -> Result<u32, DeviceError> {
        let entry = self.entry(block);
        if entry != UNALLOCATED {
            return Ok(entry);
        }
        let mut next = self.alloc.lock().await;
        let entry = self.entry(block);
        if entry != UNALLOCATED {
            return Ok(entry);
        }
        let at = *next;
        let sector = u32::try_from(at / 512)
            .ok()
            .filter(|s| *s != UNALLOCATED)
            .ok_or_else(|| DeviceError::Allocate(io::Error::other("VHD file exceeds 2 TiB")))?;
        let footer_at = at + self.layout.bitmap_size + self.layout.block_size;
        let b = self.backing.as_ref();
        let step = |r: io::Result<()>| r.map_err(DeviceError::Allocate);
        // 1. Bitmap (all ones, like qemu) over the old footer position.
        let bitmap = Bytes::from(vec![0xffu8; self.layout.bitmap_size as usize]);
        step(b.write_at(at, bitmap).await)?;
        step(b.flush().await)?;
        // 2. Data area reads as zeros (new space past the old EOF); footer at the new EOF.
        step(b.set_size(footer_at + FOOTER_LEN as u64).await)?;
        step(
            b.write_at(footer_at, Bytes::copy_from_slice(&self.footer.encode()))
                .await,
        )?;
        step(b.flush().await)?;
        // 3. The BAT entry makes the block live.
        let bat_at = self.layout.table_offset + block as u64 * 4;
        step(
            b.write_at(bat_at, Bytes::copy_from_slice(&sector.to_be_bytes()))
                .await,
        )?;
        step(b.flush().await)?;
        match self.bat.write() {
            Ok(mut bat) => bat[block] = sector,
            Err(poisoned) => poisoned.into_inner()[block] = sector,
        }
        self.bitmap_full[block].store(true, Ordering::Release);
        *next = footer_at;
        Ok(sector)
    }

    /// Makes sure an allocated block's bitmap is all ones (once per session).
    async fn fill_bitmap(&self, block: usize, entry: u32) -> Result<(), DeviceError> {
        if self.bitmap_full[block].load(Ordering::Acquire) {
            return Ok(());
        }
        let at = self.layout.bitmap_offset(entry);
        let len = self.layout.bitmap_size as usize;
        let current = self
            .backing
            .read_at(at, len)
            .await
            .map_err(DeviceError::Io)?;
        if current.iter().any(|b| *b != 0xff) {
            self.backing
                .write_at(at, Bytes::from(vec![0xffu8; len]))
                .await
                .map_err(DeviceError::Io)?;
        }
        self.bitmap_full[block].store(true, Ordering::Release);
        Ok(())
    }

    async fn flush_if(&self, fua: bool) -> Result<(), DeviceError> {
        if fua {
            self.backing.flush().await.map_err(DeviceError::Io)?;
        }
        Ok(())
    }

    /// Zeroes allocated parts of a range; unallocated blocks already read as zeros.
    async fn zero(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), DeviceError> {
        let allocated: Vec<(u32, Segment)> = self
            .segments(offset, len)
            .filter_map(|s| {
                let e = self.entry(s.block);
                (e != UNALLOCATED).then_some((e, s))
            })
            .collect();
        if mode.fast_only
            && !(mode.may_trim && self.backing.punches_holes())
            && !allocated.is_empty()
        {
            return Err(DeviceError::FastZeroUnsupported);
        }
        for (entry, s) in allocated {
            zero_range(
                self.backing.as_ref(),
                self.layout.data_offset(entry, s.in_block),
                s.len,
                mode,
            )
            .await?;
        }
        self.flush_if(mode.fua).await
    }
}

impl BlockDevice for DynamicVhd {
    fn size(&self) -> u64 {
        self.layout.virtual_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<ReadChunk>, DeviceError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for s in self.segments(offset, len as u64) {
                let entry = self.entry(s.block);
                if entry == UNALLOCATED {
                    out.push(ReadChunk::Hole {
                        offset: s.offset,
                        len: s.len as u32,
                    });
                } else {
                    let data = self
                        .backing
                        .read_at(self.layout.data_offset(entry, s.in_block), s.len as usize)
                        .await
                        .map_err(DeviceError::Io)?;
                    out.push(ReadChunk::Data {
                        offset: s.offset,
                        data,
                    });
                }
            }
            Ok(out)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.writable()?;
            for s in self.segments(offset, data.len() as u64) {
                let entry = self.allocate(s.block).await?;
                self.fill_bitmap(s.block, entry).await?;
                let start = (s.offset - offset) as usize;
                let piece = data.slice(start..start + s.len as usize);
                self.backing
                    .write_at(self.layout.data_offset(entry, s.in_block), piece)
                    .await
                    .map_err(DeviceError::Io)?;
            }
            self.flush_if(fua).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move { self.backing.flush().await.map_err(DeviceError::Io) })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.writable()?;
            if !self.backing.punches_holes() {
                // Advisory and nothing cheap to do: blocks stay allocated.
                return self.flush_if(fua).await;
            }
            let mode = ZeroMode {
                may_trim: true,
                fast_only: false,
                fua,
            };
            self.zero(offset, len, mode).await
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.writable()?;
            self.zero(offset, len, mode).await
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, DeviceError>> {
        Box::pin(async move {
            Ok(self
                .segments(offset, len as u64)
                .map(|s| Extent {
                    len: s.len as u32,
                    flags: if self.entry(s.block) == UNALLOCATED {
                        STATE_HOLE | STATE_ZERO
                    } else {
                        0
                    },
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests;
