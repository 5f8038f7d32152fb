//! [`IoPool`]: a LUN's own small set of I/O threads.
//!
//! Why not tokio's blocking pool: `spawn_blocking` wakes an idle thread for every job and grows
//! to as many threads as there are requests in flight, so 32 queued 4 KiB writes meant 32
//! sleeping threads woken one by one, each a futex wake and a context switch on a 2-core
//! machine. This pool keeps at most `max` threads for one LUN. A job queued while every thread
//! is busy costs no system call: the next free thread takes it from the queue.
//!
//! Invariants:
//! - a job runs exactly once, even when the future waiting for it was dropped (like
//!   `spawn_blocking`), so an acknowledged-or-not write is never half-cancelled in user space;
//! - an idle thread exits after [`IDLE_EXIT`]; a thread is started only when a job arrives and
//!   no thread is idle;
//! - after the pool is dropped its threads finish the queued jobs and exit.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// An idle I/O thread exits after this long without work.
const IDLE_EXIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads alive (busy or idle).
    threads: usize,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    name: String,
    max: usize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under the lock, so a poisoned lock still holds a consistent state.
        crate::lock(&self.state)
    }
}

/// A bounded pool of threads that run blocking I/O jobs for one LUN.
pub struct IoPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.inner.lock();
        f.debug_struct("IoPool")
            .field("name", &self.inner.name)
            .field("max", &self.inner.max)
            .field("threads", &s.threads)
            .field("queued", &s.jobs.len())
            .finish()
    }
}

impl IoPool {
    /// A pool of at most `max` (at least 1) threads named `name`.
    pub fn new(name: impl Into<String>, max: usize) -> IoPool {
        IoPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                name: name.into(),
                max: max.max(1),
            }),
        }
    }

    /// Runs `f` on a pool thread and returns its result. When the returned future is
    /// dropped early, `f` still runs; its result is discarded.
    pub async fn run<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await
            .map_err(|_| std::io::Error::other("I/O thread dropped the job (it panicked)"))
    }

    fn submit(&self, job: Job) -> std::io::Result<()> {
        let mut s = self.inner.lock();
        s.jobs.push_back(job);
        if s.idle > 0 {
            // Only a sleeping thread needs a wake-up; busy threads look at the queue
            // before they sleep.
            self.inner.work.notify_one();
            return Ok(());
        }
        if s.threads < self.inner.max {
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name(self.inner.name.clone())
                .spawn(move || worker(&inner));
            match spawned {
                Ok(_) => s.threads += 1,
                // Out of threads: a running thread (if any) takes the job later.
                Err(e) if s.threads == 0 => {
                    s.jobs.pop_back();
                    return Err(e);
                }
                Err(_) => {}
            }
        }
        Ok(())
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.work.notify_all();
    }
}

fn worker(inner: &Inner) {
    let mut s = inner.lock();
    loop {
        if let Some(job) = s.jobs.pop_front() {
            drop(s);
            // A panicking job drops its result sender: the waiter gets an error and this
            // thread keeps serving.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            s = inner.lock();
            continue;
        }
        if s.closed {
            break;
        }
        s.idle += 1;
        let (guard, timeout) = inner
            .work
            .wait_timeout(s, IDLE_EXIT)
            .unwrap_or_else(PoisonError::into_inner);
        s = guard;
        s.idle -= 1;
        if timeout.timed_out() && s.jobs.is_empty() {
            break;
        }
    }
    s.threads -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_at_most_max_threads_and_all_complete() {
        let pool = Arc::new(IoPool::new("t-io", 2));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..64usize {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                    running.fetch_sub(1, Ordering::SeqCst);
                    i * 2
                })
                .await
                .unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), i * 2);
        }
        assert!(peak.load(Ordering::SeqCst) <= 2, "more threads than max");
        assert!(pool.inner.lock().threads <= 2);
    }

    #[tokio::test]
    async fn a_panicking_job_fails_its_waiter_and_the_pool_keeps_serving() {
        let pool = IoPool::new("t-io", 1);
        let err = pool.run(|| panic!("boom")).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_job_whose_waiter_went_away_still_runs() {
        let pool = IoPool::new("t-io", 1);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let fut = pool.run(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        // Submitted on first poll: poll once, then drop the future.
        let mut fut = Box::pin(fut);
        let waker = std::task::Waker::noop();
        let _ = fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        drop(fut);
        pool.run(|| ()).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
