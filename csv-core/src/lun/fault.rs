//! [`FaultLun`]: a [`Lun`] wrapper that injects faults, controlled at run time through a
//! cloneable [`FaultHandle`].
//!
//! Faults, checked for every request in this order:
//! 1. **hang**: while hung, new requests block; on [`FaultHandle::release`] they continue and
//!    *execute* (like nbdkit's pause filter: a hung write still lands later, a ghost write);
//! 2. **delay**: a fixed sleep before the request;
//! 3. **fail next N**: the next N matching requests fail with the configured error, unexecuted;
//! 4. **fail all**: every matching request fails, unexecuted;
//! 5. **error rate**: a matching request fails with probability `rate`, drawn from an RNG
//!    seeded by the caller (the seed is logged and readable through [`FaultHandle::seed`]).
//!
//! Invariants: an injected failure never reaches the inner LUN (its outcome is "definitely not
//! executed"); with no faults configured the wrapper is transparent; given the seed and the
//! order in which requests reach the fault check, the injected failures are deterministic.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use super::{Lun, LunError, LunFuture};

/// The kind of a LUN request, for selecting which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl OpKind {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`OpKind`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSet(u8);

impl OpSet {
    /// Every kind of request.
    pub const ALL: OpSet = OpSet(0x1f);
    /// Writes, flushes, discards and zeroing: everything that changes the LUN.
    pub const MUTATING: OpSet = OpSet(0x1f & !1);

    /// The set holding only `kind`.
    pub fn only(kind: OpKind) -> OpSet {
        OpSet(kind.bit())
    }

    /// The set with `kind` added.
    pub fn with(self, kind: OpKind) -> OpSet {
        OpSet(self.0 | kind.bit())
    }

    /// True when `kind` is in the set.
    pub fn contains(self, kind: OpKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

impl From<OpKind> for OpSet {
    fn from(kind: OpKind) -> OpSet {
        OpSet::only(kind)
    }
}

/// Which [`LunError`] an injected fault produces (`LunError` itself is not `Clone`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    /// `LunError::Io` with this OS errno.
    Io(i32),
    PathUnreachable,
    Timeout,
    /// `LunError::Target` with this NBD errno.
    Target(u32),
    Fenced(u64),
    Closed,
}

impl FaultError {
    fn to_error(self, op: &'static str, offset: u64) -> LunError {
        match self {
            FaultError::Io(errno) => LunError::Io {
                op,
                offset,
                source: std::io::Error::from_raw_os_error(errno),
            },
            FaultError::PathUnreachable => LunError::PathUnreachable {
                reason: format!("injected fault on {op}"),
            },
            FaultError::Timeout => LunError::Timeout { op, ms: 0 },
            FaultError::Target(errno) => LunError::Target { op, errno },
            FaultError::Fenced(token) => LunError::Fenced { token },
            FaultError::Closed => LunError::Closed,
        }
    }
}

struct FailNext {
    ops: OpSet,
    remaining: u64,
    error: FaultError,
}

struct ErrorRate {
    ops: OpSet,
    rate: f64,
    error: FaultError,
    rng: StdRng,
}

#[derive(Default)]
struct FaultState {
    fail_next: Option<FailNext>,
    fail_all: Option<(OpSet, FaultError)>,
    rate: Option<ErrorRate>,
    seed: Option<u64>,
    delay: Option<Duration>,
    /// Requests currently blocked by a hang.
    hung: usize,
    injected: u64,
}

struct Shared {
    state: Mutex<FaultState>,
    /// `true` while hung; requests wait for it to become `false`.
    hang: watch::Sender<bool>,
}

/// Controls a [`FaultLun`] at run time. Cheap to clone; all clones control the same LUN.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        // The state is plain data updated in single statements; a poisoned lock is usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` requests whose kind is in `ops` fail with `error` (replaces any earlier `fail_next`).
    pub fn fail_next(&self, ops: impl Into<OpSet>, n: u64, error: FaultError) {
        self.lock().fail_next = Some(FailNext {
            ops: ops.into(),
            remaining: n,
            error,
        });
    }

    /// Every request whose kind is in `ops` fails with `error` until [`FaultHandle::clear`].
    pub fn fail_all(&self, ops: impl Into<OpSet>, error: FaultError) {
        self.lock().fail_all = Some((ops.into(), error));
    }

    /// Requests whose kind is in `ops` fail with probability `rate` (0.0..=1.0), using an RNG
    /// seeded with `seed`. The seed is logged and kept for [`FaultHandle::seed`].
    pub fn set_error_rate(&self, ops: impl Into<OpSet>, rate: f64, error: FaultError, seed: u64) {
        tracing::info!(seed, rate, "fault LUN: error rate armed");
        let mut st = self.lock();
        st.seed = Some(seed);
        st.rate = Some(ErrorRate {
            ops: ops.into(),
            rate: rate.clamp(0.0, 1.0),
            error,
            rng: StdRng::seed_from_u64(seed),
        });
    }

    /// The seed of the current error rate, if one is armed.
    pub fn seed(&self) -> Option<u64> {
        self.lock().seed
    }

    /// Every request first sleeps `delay` (`None` removes the delay).
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.lock().delay = delay;
    }

    /// New requests block until [`FaultHandle::release`]; then they execute.
    pub fn hang(&self) {
        self.shared.hang.send_replace(true);
    }

    /// Lets every hung request continue (they execute in no particular order).
    pub fn release(&self) {
        self.shared.hang.send_replace(false);
    }

    /// Number of requests currently blocked by [`FaultHandle::hang`].
    pub fn hung(&self) -> usize {
        self.lock().hung
    }

    /// Number of failures injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Removes every fault (error rules, delay) and releases hung requests.
    pub fn clear(&self) {
        {
            let mut st = self.lock();
            st.fail_next = None;
            st.fail_all = None;
            st.rate = None;
            st.seed = None;
            st.delay = None;
        }
        self.release();
    }

    /// Decides whether this request fails; counts the injection.
    fn decide(&self, kind: OpKind) -> Option<FaultError> {
        let mut st = self.lock();
        let mut out = None;
        if let Some(next) = st.fail_next.as_mut()
            && next.ops.contains(kind)
            && next.remaining > 0
        {
            next.remaining -= 1;
            out = Some(next.error);
        }
        if out.is_none()
            && let Some((ops, error)) = st.fail_all
            && ops.contains(kind)
        {
            out = Some(error);
        }
        if out.is_none()
            && let Some(rate) = st.rate.as_mut()
            && rate.ops.contains(kind)
            && rate.rng.random_bool(rate.rate)
        {
            out = Some(rate.error);
        }
        if out.is_some() {
            st.injected += 1;
        }
        out
    }

    /// Waits out hang and delay, then returns an injected error if this request must fail.
    async fn gate(&self, kind: OpKind, op: &'static str, offset: u64) -> Result<(), LunError> {
        let mut rx = self.shared.hang.subscribe();
        if *rx.borrow_and_update() {
            self.lock().hung += 1;
            let _count = HungGuard(self);
            // The sender lives in `self.shared`, so `wait_for` cannot fail while we hold `self`.
            let _ = rx.wait_for(|hung| !*hung).await;
        }
        let delay = self.lock().delay;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        match self.decide(kind) {
            Some(err) => Err(err.to_error(op, offset)),
            None => Ok(()),
        }
    }
}

/// Decrements the hung counter when a hung request continues or is dropped.
struct HungGuard<'a>(&'a FaultHandle);

impl Drop for HungGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().hung -= 1;
    }
}

/// A [`Lun`] that forwards to `L` after the faults configured through its [`FaultHandle`].
pub struct FaultLun<L: Lun> {
    inner: L,
    handle: FaultHandle,
}

impl<L: Lun> FaultLun<L> {
    /// Wraps `inner` with no faults configured.
    pub fn new(inner: L) -> FaultLun<L> {
        let (hang, _) = watch::channel(false);
        FaultLun {
            inner,
            handle: FaultHandle {
                shared: Arc::new(Shared {
                    state: Mutex::new(FaultState::default()),
                    hang,
                }),
            },
        }
    }

    /// A handle controlling this LUN's faults.
    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    /// The wrapped LUN.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: Lun> Lun for FaultLun<L> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn alignment(&self) -> u32 {
        self.inner.alignment()
    }

    fn describe(&self) -> String {
        format!("fault({})", self.inner.describe())
    }

    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        Box::pin(async move {
            self.handle.gate(OpKind::Read, "read", offset).await?;
            self.inner.read_at(offset, len).await
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.handle.gate(OpKind::Write, "write", offset).await?;
            self.inner.write_at(offset, data, fua).await
        })
    }

    fn flush(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.handle.gate(OpKind::Flush, "flush", 0).await?;
            self.inner.flush().await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.handle.gate(OpKind::Discard, "discard", offset).await?;
            self.inner.discard(offset, len).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.handle
                .gate(OpKind::WriteZeroes, "write_zeroes", offset)
                .await?;
            self.inner.write_zeroes(offset, len).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::mem::MemLun;
    use std::time::Instant;

    fn data(b: u8) -> Bytes {
        Bytes::from(vec![b; 512])
    }

    #[tokio::test]
    async fn fail_next_n_fails_exactly_n_matching_ops_without_executing_them() {
        let lun = FaultLun::new(MemLun::new(1 << 20));
        let h = lun.handle();
        h.fail_next(OpKind::Write, 2, FaultError::Io(libc::EIO));
        lun.read_at(0, 512).await.unwrap();
        for _ in 0..2 {
            let err = lun.write_at(0, data(1), false).await.unwrap_err();
            assert!(matches!(err, LunError::Io { op: "write", .. }), "{err}");
        }
        assert_eq!(lun.read_at(0, 512).await.unwrap(), data(0));
        lun.write_at(0, data(1), false).await.unwrap();
        assert_eq!(lun.read_at(0, 512).await.unwrap(), data(1));
        assert_eq!(h.injected(), 2);
    }

    #[tokio::test]
    async fn fail_all_applies_to_chosen_kinds_until_cleared() {
        let lun = FaultLun::new(MemLun::new(1 << 20));
        let h = lun.handle();
        h.fail_all(OpSet::only(OpKind::Flush), FaultError::PathUnreachable);
        lun.write_at(0, data(3), false).await.unwrap();
        for _ in 0..3 {
            assert!(matches!(
                lun.flush().await,
                Err(LunError::PathUnreachable { .. })
            ));
        }
        h.clear();
        lun.flush().await.unwrap();
    }

    async fn failures_for_seed(seed: u64) -> Vec<bool> {
        let lun = FaultLun::new(MemLun::new(1 << 20));
        lun.handle()
            .set_error_rate(OpSet::ALL, 0.3, FaultError::Target(5), seed);
        let mut out = Vec::new();
        for i in 0..200u64 {
            out.push(lun.read_at((i % 8) * 512, 512).await.is_err());
        }
        out
    }

    #[tokio::test]
    async fn error_rate_is_deterministic_given_the_seed() {
        let seed = rand::random::<u64>();
        println!("fault seed: {seed}");
        let a = failures_for_seed(seed).await;
        assert_eq!(a, failures_for_seed(seed).await);
        let n = a.iter().filter(|&&f| f).count();
        assert!((20..=110).contains(&n), "{n} failures of 200 at rate 0.3");
    }

    #[tokio::test]
    async fn hung_write_executes_after_release() {
        let lun = Arc::new(FaultLun::new(MemLun::new(1 << 20)));
        let h = lun.handle();
        h.hang();
        let l2 = lun.clone();
        let task = tokio::spawn(async move { l2.write_at(0, data(9), false).await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.hung() == 0 {
            assert!(Instant::now() < deadline, "write never reached the hang");
            tokio::task::yield_now().await;
        }
        assert_eq!(lun.inner().read_at(0, 512).await.unwrap(), data(0));
        h.release();
        task.await.unwrap().unwrap();
        assert_eq!(lun.inner().read_at(0, 512).await.unwrap(), data(9));
        assert_eq!(h.hung(), 0);
    }

    #[tokio::test]
    async fn wraps_a_shared_dyn_lun() {
        let shared: Arc<dyn Lun> = Arc::new(MemLun::new(1 << 20));
        let lun = FaultLun::new(shared.clone());
        lun.handle()
            .fail_next(OpSet::MUTATING, 1, FaultError::Fenced(7));
        assert!(matches!(
            lun.write_at(0, data(1), false).await,
            Err(LunError::Fenced { token: 7 })
        ));
        lun.write_at(0, data(2), false).await.unwrap();
        assert_eq!(shared.read_at(0, 512).await.unwrap(), data(2));
        assert_eq!(lun.describe(), "fault(mem:1048576)");
    }

    #[tokio::test]
    async fn delay_postpones_every_request() {
        let lun = FaultLun::new(MemLun::new(1 << 20));
        lun.handle().set_delay(Some(Duration::from_millis(50)));
        let t0 = Instant::now();
        lun.flush().await.unwrap();
        lun.read_at(0, 512).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }
}
