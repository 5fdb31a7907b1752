//! How the CPU kernels share the machine: worker mode, where a pipeline runs one batch per core
//! and each batch's products stay on its own thread, and the pointer parallel jobs write
//! through.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

thread_local! {
    static IN_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True inside [`as_worker`]: kernels run on the calling thread only.
pub fn in_worker() -> bool {
    IN_WORKER.with(|w| w.get())
}

/// Run `f` as one of several data-parallel workers: its matmuls stay on this thread instead of
/// fanning out (the other cores are busy with the other workers' inputs).
pub fn as_worker<R>(f: impl FnOnce() -> R) -> R {
    let prev = IN_WORKER.with(|w| w.replace(true));
    let r = f();
    IN_WORKER.with(|w| w.set(prev));
    r
}

/// `f(0)`, ..., `f(n - 1)` spread over the threads ([`par_ranges`]). Inside a worker (one
/// batch per core), or with one task, on the calling thread.
///
/// A task that splits again runs that split inline: the pool's own threads do so by
/// themselves, and the calling thread (which takes a share of the tasks while holding the
/// pool) is marked here.
pub fn par_tasks(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 || in_worker() {
        (0..n).for_each(f);
        return;
    }
    par_ranges(n, |r| r.for_each(&f));
}

/// `f` over ranges that together cover `0..n` once, spread over the threads: ours
/// ([`Pool`]), or candle's barrier pool with `FERROFORMERS_POOL=candle`. Nested calls, and
/// calls while another thread holds the pool, run on the calling thread.
pub fn par_ranges(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || IN_TASKS.with(|t| t.get()) {
        f(0..n);
        return;
    }
    /// Clears the mark when the tasks are done, panicking or not.
    struct Unmark;
    impl Drop for Unmark {
        fn drop(&mut self) {
            IN_TASKS.with(|t| t.set(false));
        }
    }
    IN_TASKS.with(|t| t.set(true));
    let _unmark = Unmark;
    match pool() {
        Some(p) => p.run(n, &f),
        None => candle_core::utils::barrier_pool().execute_chunked(n, f),
    }
}

/// Our pool, unless `FERROFORMERS_POOL=candle` asks for candle's barrier pool.
fn pool() -> Option<&'static Pool> {
    static POOL: std::sync::OnceLock<Option<Pool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        if std::env::var("FERROFORMERS_POOL").is_ok_and(|v| v == "candle") {
            return None;
        }
        Some(Pool::new(candle_core::utils::get_num_threads().max(1) - 1))
    })
    .as_ref()
}

/// One split job: the caller's closure, a shared cursor over its items, the chunk size.
struct Job<'a> {
    f: &'a (dyn Fn(std::ops::Range<usize>) + Sync),
    n: usize,
    chunk: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Job<'_> {
    /// Take chunks until none are left (a panic is kept for the caller, the others go on).
    fn work(&self) {
        loop {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.n {
                return;
            }
            let r = start..self.n.min(start + self.chunk);
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(r))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
        }
    }
}

/// The bit of [`Pool::state`] that closes the current job to late workers; the bits below
/// count the workers inside it.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// The kernels' thread pool, made for many short splits (a decoding step is ~100 products,
/// attention and row loops of tens of microseconds each) on machines that other processes
/// share:
/// - workers spin a little between jobs, then yield, then sleep: a forward pass's splits do
///   not each pay a sleep and wake-up (rayon's hand-offs cost a quarter of one MiniLM
///   sentence's time);
/// - the caller works too, over a shared cursor, and waits at the end only for workers that
///   took part: a worker the OS has not scheduled (another process on its core) neither holds
///   up the job nor has items set aside for it, where a barrier would spin until it runs
///   (candle's barrier pool waits for every worker: with a busy process beside it on 2 cores,
///   SmolLM2 fell from ~180 to 15-19 tokens/s);
/// - waiting turns to `yield_now` after a short spin, so a waiting thread gives its core to the
///   one it waits for;
/// - no thread is pinned to a core;
/// - a second caller while a job runs (two requests at once) runs its job alone, instead of
///   queueing behind the first.
struct Pool {
    threads: Vec<std::thread::Thread>,
    /// Bumped for each job: workers wake on a change.
    generation: AtomicUsize,
    /// [`CLOSED`] | the number of workers inside the current job.
    state: AtomicUsize,
    /// The current job, valid while `state` is open or counts a worker that entered it open.
    job: AtomicPtr<Job<'static>>,
    busy: Mutex<()>,
}

/// Spins of a waiting thread before it yields, and yields before a worker sleeps.
const SPINS: u32 = 2_000;
const YIELDS: u32 = 200;

impl Pool {
    fn new(workers: usize) -> Pool {
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("ferroformers-{i}"))
                .spawn(|| {
                    IN_TASKS.with(|t| t.set(true));
                    // Blocks until the pool below is in place (`pool()` builds it once).
                    if let Some(p) = pool() {
                        p.serve();
                    }
                });
            match spawned {
                Ok(h) => threads.push(h.thread().clone()),
                Err(_) => break,
            }
        }
        Pool {
            threads,
            generation: AtomicUsize::new(0),
            state: AtomicUsize::new(CLOSED),
            job: AtomicPtr::new(std::ptr::null_mut()),
            busy: Mutex::new(()),
        }
    }

    /// A worker's loop: wait for a new job, enter it if it is still open, help, leave.
    fn serve(&self) {
        let mut seen = self.generation.load(Ordering::Acquire);
        loop {
            let mut waited = 0u32;
            loop {
                let g = self.generation.load(Ordering::Acquire);
                if g != seen {
                    seen = g;
                    break;
                }
                waited += 1;
                if waited < SPINS {
                    std::hint::spin_loop();
                } else if waited < SPINS + YIELDS {
                    std::thread::yield_now();
                } else {
                    // A token left by `unpark` since the last check makes this return at once.
                    std::thread::park();
                    waited = 0;
                }
            }
            let s = self.state.fetch_add(1, Ordering::AcqRel);
            if s & CLOSED == 0 {
                // SAFETY: the job is open and counts this worker: its caller waits for the
                // count to drop before the job goes out of scope.
                let job = unsafe { &*self.job.load(Ordering::Acquire) };
                job.work();
            }
            self.state.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn run(&self, n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let Ok(_busy) = self.busy.try_lock() else {
            f(0..n);
            return;
        };
        let threads = self.threads.len() + 1;
        let job = Job {
            f,
            n,
            // ~8 grabs per thread: little cursor traffic, a small tail.
            chunk: n.div_ceil(threads * 8).max(1),
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        // SAFETY (lifetime): workers reach the job only through `state` (see `serve`), and
        // this function returns only once every worker that entered has left.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        self.job.store(ptr, Ordering::Release);
        // Open (workers that saw the last job closed may still be counted: they leave
        // without touching any job).
        self.state.fetch_and(!CLOSED, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::Release);
        for t in &self.threads {
            t.unpark();
        }
        job.work();
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut waited = 0u32;
        while self.state.load(Ordering::Acquire) & !CLOSED != 0 {
            waited += 1;
            if waited < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }
}

thread_local! {
    /// True on the thread that called [`par_tasks`], while its tasks run.
    static IN_TASKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A buffer's base pointer handed to parallel jobs that each write their own disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for writes to disjoint parts of one buffer.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::par_tasks;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every task runs once, and a task that splits again runs its split inline instead of
    /// waiting on the pool it is part of.
    #[test]
    fn tasks_run_once_and_nested_splits_run_inline() {
        let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        par_tasks(8, |i| {
            par_tasks(8, |j| {
                hits[i * 8 + j].fetch_add(1, Ordering::Relaxed);
            })
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    /// Many jobs back to back from several threads at once (a second caller runs alone while
    /// the pool is busy), each item exactly once; a panicking task reaches its caller and the
    /// pool goes on.
    #[test]
    fn concurrent_callers_and_panics() {
        std::thread::scope(|s| {
            for t in 0..3 {
                s.spawn(move || {
                    for round in 0..300 {
                        let n = 1 + (round * 7 + t) % 97;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        super::par_ranges(n, |r| {
                            for i in r {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            }
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
        let r = std::panic::catch_unwind(|| {
            par_tasks(64, |i| {
                if i == 40 {
                    panic!("task 40");
                }
            })
        });
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        par_tasks(100, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }
}
