//! A small fork-join pool for the decode hot path.
//!
//! A decode step is a chain of ~150 short parallel sections (one per matrix-vector product),
//! each well under a millisecond. A pool whose idle workers sleep pays a wake-up per section,
//! and in a virtual machine waking a halted vCPU costs tens to hundreds of microseconds: that
//! alone cost vibee a third of its decode bandwidth under rayon. Here workers spin for a short
//! while after each section (as OpenMP and llama.cpp's thread pool do) and only then park.
//! A pool with more threads than the machine has cores never spins: a spinning thread would
//! hold a core that a thread with work is waiting for, and every section would wait out the
//! scheduler's time slices of all the spinners.
//! Work is split statically: worker `w` of `T` takes chunks `w`, `w + T`, … .

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking, when every thread has a core of its own.
const SPIN: Duration = Duration::from_millis(2);

/// The cores this process may run on (its CPU affinity and cgroup quota included).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

type Job = dyn Fn(usize) + Sync;

struct Shared {
    generation: AtomicU64,
    /// The running section's job; only valid while `remaining` is non-zero.
    job: AtomicPtr<&'static Job>,
    remaining: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// More threads than cores: waiting threads yield their core instead of spinning.
    oversubscribed: bool,
    /// One section at a time; a caller that finds the pool busy runs its work alone.
    busy: Mutex<()>,
}

impl Pool {
    /// A pool that runs sections on `threads` threads: the caller and `threads - 1` workers
    /// (fewer if the system refuses to start that many).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let threads = threads.max(1);
        let oversubscribed = threads > available_cores();
        let spin = if oversubscribed { Duration::ZERO } else { SPIN };
        let mut workers = 0;
        for index in 1..threads {
            let shared = shared.clone();
            let started = std::thread::Builder::new()
                .name(format!("vibee-worker-{index}"))
                .spawn(move || worker(&shared, index, spin));
            if let Err(e) = started {
                // Worker indices stay contiguous, so the pool simply runs on fewer threads.
                tracing::warn!("could start only {index} of {threads} threads ({e}): using those");
                break;
            }
            workers = index;
        }
        Self {
            shared,
            workers,
            oversubscribed,
            busy: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `job(thread_index)` once on each of the pool's threads and waits for all.
    pub fn broadcast<'a>(&self, job: &'a (dyn Fn(usize) + Sync + 'a)) {
        let Ok(_section) = self.busy.try_lock() else {
            for index in 0..self.threads() {
                job(index);
            }
            return;
        };
        if self.workers == 0 {
            job(0);
            return;
        }
        let shared = &self.shared;
        // SAFETY: the reference is only used by workers before they decrement `remaining`, and
        // this function does not return until `remaining` is zero, so `job` outlives every use.
        let erased: &'static Job =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Job>(job) };
        let mut slot = erased;
        shared.job.store(&mut slot, SeqCst);
        shared.remaining.store(self.workers, SeqCst);
        shared.generation.fetch_add(1, SeqCst);
        if shared.sleepers.load(SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        while shared.remaining.load(SeqCst) != 0 {
            if self.oversubscribed {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        shared.job.store(std::ptr::null_mut(), SeqCst);
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if shared.panicked.swap(false, SeqCst) {
            panic!("a worker thread panicked in a parallel section");
        }
    }

    /// Runs `f(task)` for every task in `0..tasks`, spread over the pool's threads.
    pub fn for_each_task(&self, tasks: usize, f: impl Fn(usize) + Sync) {
        let threads = self.threads();
        self.broadcast(&|thread| (thread..tasks).step_by(threads).for_each(&f));
    }

    /// Splits `data` into chunks of `chunk_len` and runs `f(chunk_index, chunk)` on each, in
    /// parallel.
    pub fn for_each_chunk<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let chunk_len = chunk_len.max(1);
        let chunks = data.len().div_ceil(chunk_len);
        let threads = self.threads();
        let base = SendPtr(data.as_mut_ptr());
        let len = data.len();
        self.broadcast(&|thread| {
            let base = &base;
            for chunk in (thread..chunks).step_by(threads) {
                let start = chunk * chunk_len;
                let end = (start + chunk_len).min(len);
                // SAFETY: chunk ranges are disjoint and each is visited by exactly one thread,
                // and `data` stays mutably borrowed until `broadcast` returns.
                let slice =
                    unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
                f(chunk, slice);
            }
        });
    }
}

/// A pointer into one `&mut [T]` that pool threads write disjoint parts of.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: used only to hand disjoint parts of one `&mut [T]` to pool threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Worker `index`'s loop: run each new section, then spin for `spin` before parking.
fn worker(shared: &Shared, index: usize, spin: Duration) {
    let mut seen = 0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = shared.generation.load(SeqCst);
            if generation != seen {
                seen = generation;
                break;
            }
            spins = spins.wrapping_add(1);
            if spin.is_zero() || (spins.is_multiple_of(1024) && started.elapsed() > spin) {
                let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, SeqCst);
                while shared.generation.load(SeqCst) == seen {
                    guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleepers.fetch_sub(1, SeqCst);
            }
            std::hint::spin_loop();
        }
        // SAFETY: a new generation is published only with a live job (see `broadcast`).
        let job: &Job = unsafe { *shared.job.load(SeqCst) };
        if catch_unwind(AssertUnwindSafe(|| job(index))).is_err() {
            shared.panicked.store(true, SeqCst);
        }
        shared.remaining.fetch_sub(1, SeqCst);
    }
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// The process-wide pool, sized like rayon's global pool (so `--threads` sets both).
pub fn pool() -> &'static Pool {
    GLOBAL.get_or_init(|| Pool::new(rayon::current_num_threads()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_visited_once() {
        let pool = Pool::new(3);
        for len in [0, 1, 7, 1000] {
            let mut data = vec![0u32; len];
            pool.for_each_chunk(&mut data, 3, |chunk, slice| {
                for v in slice.iter_mut() {
                    *v += 1 + chunk as u32;
                }
            });
            for (i, v) in data.iter().enumerate() {
                assert_eq!(*v, 1 + (i / 3) as u32);
            }
        }
    }

    #[test]
    fn a_panicking_section_is_reported_and_the_pool_still_works() {
        let pool = Pool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.broadcast(&|t| assert!(t != 1, "boom"))
        }));
        assert!(result.is_err());
        let mut data = vec![0u8; 10];
        pool.for_each_chunk(&mut data, 1, |_, s| s[0] = 1);
        assert!(data.iter().all(|v| *v == 1));
    }

    #[test]
    fn an_oversubscribed_pool_does_not_spin_and_still_works() {
        let threads = available_cores() * 4;
        let pool = Pool::new(threads);
        assert!(pool.oversubscribed);
        assert_eq!(pool.threads(), threads);
        // Many short sections, as decoding runs them: with spinning workers each section
        // waited out their time slices (15 s for these on 2 cores), parking takes well under 1.
        let started = Instant::now();
        let mut data = vec![0u32; threads * 3];
        for _ in 0..1000 {
            pool.for_each_chunk(&mut data, 1, |_, s| s[0] += 1);
        }
        assert!(data.iter().all(|v| *v == 1000));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(!Pool::new(1).oversubscribed);
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3);
        let mut data = vec![0u8; 4];
        pool.for_each_chunk(&mut data, 1, |_, s| s[0] = 7);
        assert_eq!(data, [7; 4]);
    }
}
