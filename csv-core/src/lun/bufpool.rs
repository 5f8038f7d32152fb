//! [`BufPool`]: large read buffers recycled, most recently freed first.
//!
//! A 1 MiB read copies the page cache into a buffer that the NBD server then copies into the
//! socket. A fresh allocation has cold cache lines (and may be new pages); the buffer freed a
//! moment ago by the previous reply is still in the CPU cache. Invariants:
//! - a recycled buffer is handed out empty (`len == 0`): its old bytes are never exposed;
//!   the caller fills it and sets the length only after the kernel wrote every byte;
//! - the pool holds at most `max` buffers; buffers below [`POOL_MIN`] are not pooled
//!   (the allocator's own caches serve them well), nor above [`POOL_MAX`] (a client sending
//!   32 MiB requests must not leave `max` such buffers idle);
//! - a buffer outliving its pool is simply freed.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::lock;

/// Buffers smaller than this are allocated normally.
pub const POOL_MIN: usize = 64 << 10;
/// Buffers with more capacity than this are freed, not kept.
pub const POOL_MAX: usize = 2 << 20;

/// A LIFO cache of large buffers.
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufPool {
    /// A pool keeping at most `max` idle buffers.
    pub fn new(max: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            max,
        })
    }

    /// An empty buffer with room for at least `len` bytes: the most recently returned one
    /// that fits (and is less than twice as large), or a new allocation.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if (POOL_MIN..=POOL_MAX).contains(&len) {
            let mut free = lock(&self.free);
            if let Some(i) = free
                .iter()
                .rposition(|b| b.capacity() >= len && b.capacity() / 2 < len)
            {
                return free.swap_remove(i);
            }
        }
        Vec::with_capacity(len)
    }

    /// Wraps a filled buffer; when the last reference to the `Bytes` goes away, the buffer
    /// returns to the pool.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if !(POOL_MIN..=POOL_MAX).contains(&buf.capacity()) {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Recycled {
            buf,
            pool: Arc::downgrade(self),
        })
    }

    /// Takes back a buffer (emptied first).
    pub fn give_back(&self, mut buf: Vec<u8>) {
        if !(POOL_MIN..=POOL_MAX).contains(&buf.capacity()) {
            return;
        }
        buf.clear();
        let mut free = lock(&self.free);
        if free.len() < self.max {
            free.push(buf);
        }
    }

    /// Idle buffers held.
    pub fn idle(&self) -> usize {
        lock(&self.free).len()
    }
}

/// A pooled buffer behind a `Bytes`.
struct Recycled {
    buf: Vec<u8>,
    pool: Weak<BufPool>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_buffer_is_reused_empty_and_small_or_huge_ones_are_not_pooled() {
        let pool = BufPool::new(2);
        let mut a = pool.take(1 << 20);
        a.extend_from_slice(&[7u8; 1 << 20]);
        let ptr = a.as_ptr();
        let bytes = pool.freeze(a);
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(pool.idle(), 0);
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(pool.idle(), 0, "still referenced");
        drop(clone);
        assert_eq!(pool.idle(), 1);
        let b = pool.take(1 << 20);
        assert_eq!(b.as_ptr(), ptr, "the warm buffer comes back");
        assert!(b.is_empty(), "old bytes must not be exposed");
        // Too large for a 100 KiB request (more than twice): a new buffer instead.
        pool.give_back(b);
        assert_eq!(pool.take(100 << 10).capacity(), 100 << 10);
        let small = pool.freeze(vec![1u8; 512]);
        drop(small);
        assert_eq!(pool.idle(), 1);
        let huge = pool.take(POOL_MAX + 1);
        pool.give_back(huge);
        assert_eq!(pool.idle(), 1, "oversized buffers are freed, not kept");
    }

    #[test]
    fn the_pool_keeps_at_most_max_buffers_and_outliving_buffers_are_freed() {
        let pool = BufPool::new(2);
        let held: Vec<Bytes> = (0..4)
            .map(|_| {
                let mut v = pool.take(POOL_MIN);
                v.resize(POOL_MIN, 1);
                pool.freeze(v)
            })
            .collect();
        drop(held);
        assert_eq!(pool.idle(), 2);
        let mut v = pool.take(POOL_MIN);
        v.resize(POOL_MIN, 2);
        let b = pool.freeze(v);
        drop(pool);
        assert_eq!(b[0], 2);
        drop(b);
    }
}
