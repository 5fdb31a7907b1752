//! How the CPU kernels share the machine: worker mode, where a pipeline runs one batch per core
//! and each batch's products stay on its own thread, and the pointer parallel jobs write
//! through.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

thread_local! {
    static IN_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread runs at the idle scheduling priority ([`at_idle_priority`]).
    static IDLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with this thread at the idle scheduling priority (Linux `SCHED_IDLE`), and the
/// pool's workers too while they help with its jobs: any other thread of the machine (a
/// server's network and streaming threads, other processes in its cgroup) that wakes up
/// takes a core from them at once, and they get the cores nobody else wants. A server's
/// decoding steps run so, so that a request's tokens reach its client while the next step
/// computes instead of after it. Where a thread could not come back from the idle priority
/// ([`idle_priority_available`]), and elsewhere than Linux, `f` runs as it is.
pub fn at_idle_priority<R>(f: impl FnOnce() -> R) -> R {
    if idle_priority() || !idle_priority_available() || !set_idle(true) {
        return f();
    }
    /// Back to the normal priority when `f` is done, panicking or not.
    struct Normal;
    impl Drop for Normal {
        fn drop(&mut self) {
            set_idle(false);
        }
    }
    let _normal = Normal;
    f()
}

/// Whether [`at_idle_priority`] can work here: a thread may go to the idle priority and
/// come back. Coming back needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of at least 20 - nice
/// (Docker's default capabilities lack the former): without them a thread that went idle
/// would stay so. Tried once, on a thread of its own.
pub fn idle_priority_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::thread::spawn(|| set_idle(true) && set_idle(false))
            .join()
            .unwrap_or(false)
    })
}

/// Whether the calling thread runs at the idle scheduling priority ([`at_idle_priority`]).
pub fn idle_priority() -> bool {
    IDLE.with(|i| i.get())
}

/// The calling thread to `SCHED_IDLE` (`idle`) or back to `SCHED_OTHER` (its nice value
/// stays); whether it now runs so.
fn set_idle(idle: bool) -> bool {
    if idle_priority() == idle {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
            IDLE.with(|i| i.set(idle));
            return true;
        }
    }
    false
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
    /// The caller runs at the idle priority: so do the workers that help it.
    idle: bool,
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
/// - no thread is pinned to a core, but a parked worker is woken away from the caller's
///   core ([`steer`]): Linux wakes a thread on its waker's core when the machine is busy on
///   average (the idle-core search is cut short), and the worker then waited there, behind
///   the caller, while the other core idled: 14% of wake-ups took 1-5 ms, so one decoding step
///   in seven of a 16-row SmolLM2 batch ran on one core;
/// - a second caller while a job runs (two requests at once) runs its job alone, instead of
///   queueing behind the first.
struct Pool {
    threads: Vec<Worker>,
    /// Bumped for each job: workers wake on a change.
    generation: AtomicUsize,
    /// [`CLOSED`] | the number of workers inside the current job.
    state: AtomicUsize,
    /// The current job, valid while `state` is open or counts a worker that entered it open.
    job: AtomicPtr<Job<'static>>,
    busy: Mutex<()>,
    /// Wake-ups steered off the caller's core so far.
    steered: AtomicUsize,
}

/// One of the pool's threads, and what a caller needs to wake it away from its own core.
struct Worker {
    thread: std::thread::Thread,
    /// Set while the worker is parked (or about to be).
    parked: std::sync::atomic::AtomicBool,
    /// The caller narrowed the worker's cores for its wake-up ([`steer`]): the worker widens
    /// them again once awake.
    steered: std::sync::atomic::AtomicBool,
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    home: std::sync::OnceLock<steer::Home>,
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
                .spawn(move || {
                    IN_TASKS.with(|t| t.set(true));
                    // Blocks until the pool below is in place (`pool()` builds it once).
                    if let Some(p) = pool() {
                        p.serve(i);
                    }
                });
            match spawned {
                Ok(h) => threads.push(Worker {
                    thread: h.thread().clone(),
                    parked: std::sync::atomic::AtomicBool::new(false),
                    steered: std::sync::atomic::AtomicBool::new(false),
                    #[cfg(all(target_os = "linux", target_env = "gnu"))]
                    home: std::sync::OnceLock::new(),
                }),
                Err(_) => break,
            }
        }
        Pool {
            threads,
            generation: AtomicUsize::new(0),
            state: AtomicUsize::new(CLOSED),
            job: AtomicPtr::new(std::ptr::null_mut()),
            busy: Mutex::new(()),
            steered: AtomicUsize::new(0),
        }
    }

    /// A worker's loop: wait for a new job, enter it if it is still open, help, leave.
    fn serve(&self, i: usize) {
        let me = &self.threads[i];
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if let Some(h) = steer::Home::here() {
            let _ = me.home.set(h);
        }
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
                    me.parked.store(true, Ordering::SeqCst);
                    if self.generation.load(Ordering::Acquire) == seen {
                        std::thread::park();
                    }
                    me.parked.store(false, Ordering::SeqCst);
                    waited = 0;
                }
            }
            let s = self.state.fetch_add(1, Ordering::AcqRel);
            if s & CLOSED == 0 {
                // SAFETY: the job is open and counts this worker: its caller waits for the
                // count to drop before the job goes out of scope.
                let job = unsafe { &*self.job.load(Ordering::Acquire) };
                set_idle(job.idle);
                job.work();
            }
            self.state.fetch_sub(1, Ordering::AcqRel);
            if me.steered.swap(false, Ordering::AcqRel) {
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                if let Some(h) = me.home.get() {
                    h.restore();
                }
            }
        }
    }

    fn run(&self, n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        // A job that panicked (the panic goes on to its caller) poisoned the lock: it guards
        // nothing but the pool's use, so the pool goes on. (Before, every later job ran on its
        // caller's thread alone: one panic made the process single-threaded.)
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                f(0..n);
                return;
            }
        };
        let threads = self.threads.len() + 1;
        let job = Job {
            f,
            idle: idle_priority(),
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
        // The caller's core, asked only when a worker is asleep.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        let here = std::cell::OnceCell::new();
        for w in &self.threads {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            if w.parked.load(Ordering::SeqCst) {
                let cpu = *here.get_or_init(steer::current_cpu);
                if let (Some(cpu), Some(h)) = (cpu, w.home.get()) {
                    if h.avoid(cpu) {
                        w.steered.store(true, Ordering::Release);
                        self.steered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            w.thread.unpark();
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

/// Waking a parked worker on another core than the caller's: its allowed cores narrowed to
/// the others just before the wake-up (`sched_setaffinity` on its thread id), and widened back
/// to what it had (the process's mask: `taskset`, cgroups) by the worker once it runs.
/// `FERROFORMERS_NO_STEER=1` turns it off.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod steer {
    /// A worker's thread id and the cores it may run on.
    #[derive(Clone)]
    pub(super) struct Home {
        pub(super) tid: libc::pid_t,
        pub(super) cores: libc::cpu_set_t,
    }

    impl Home {
        /// The calling thread's; `None` when the switch is off or the mask cannot be read, or
        /// it allows one core only.
        pub(super) fn here() -> Option<Home> {
            if super::super::switch_on("FERROFORMERS_NO_STEER") {
                return None;
            }
            // SAFETY: plain system calls on this thread; the set is written by the kernel.
            unsafe {
                let mut cores: libc::cpu_set_t = std::mem::zeroed();
                let size = std::mem::size_of::<libc::cpu_set_t>();
                if libc::sched_getaffinity(0, size, &mut cores) != 0 || libc::CPU_COUNT(&cores) < 2
                {
                    return None;
                }
                Some(Home {
                    tid: libc::gettid(),
                    cores,
                })
            }
        }

        /// Let the worker run anywhere it may but on `cpu` (its next wake-up lands elsewhere);
        /// false when that leaves no core.
        pub(super) fn avoid(&self, cpu: usize) -> bool {
            let mut set = self.cores;
            // SAFETY: a set of the kernel's size; `cpu` is checked against it.
            unsafe {
                if cpu >= libc::CPU_SETSIZE as usize || !libc::CPU_ISSET(cpu, &set) {
                    return false;
                }
                libc::CPU_CLR(cpu, &mut set);
                libc::CPU_COUNT(&set) > 0
                    && libc::sched_setaffinity(self.tid, std::mem::size_of_val(&set), &set) == 0
            }
        }

        /// The worker's own cores again (called on the worker).
        pub(super) fn restore(&self) {
            // SAFETY: the mask read when the worker started.
            unsafe {
                libc::sched_setaffinity(0, std::mem::size_of_val(&self.cores), &self.cores);
            }
        }
    }

    /// The core the calling thread runs on.
    pub(super) fn current_cpu() -> Option<usize> {
        // SAFETY: no arguments; -1 on failure.
        let c = unsafe { libc::sched_getcpu() };
        usize::try_from(c).ok()
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
    use std::sync::Mutex;

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

    /// Inside `at_idle_priority` the caller and the workers that take part in its jobs run at
    /// `SCHED_IDLE`; after it (also after a panic) the caller is back at `SCHED_OTHER`, and
    /// so are the workers of a normal caller's jobs.
    #[cfg(target_os = "linux")]
    #[test]
    fn idle_priority_travels_with_jobs_and_ends_with_them() {
        use super::{at_idle_priority, idle_priority, idle_priority_available, par_ranges};
        if !idle_priority_available() {
            eprintln!("skipped: this process may not come back from SCHED_IDLE");
            return;
        }
        // SAFETY: no arguments; the calling thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let policies = || {
            let seen = Mutex::new(Vec::new());
            for _ in 0..50 {
                par_ranges(64, |r| {
                    // Long enough for a worker to join in.
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_micros(20 * r.len() as u64) {
                        std::hint::spin_loop();
                    }
                    let id = std::thread::current().id();
                    seen.lock().unwrap().push((id, policy()));
                });
            }
            let mut seen = seen.into_inner().unwrap();
            seen.sort_by_key(|s| format!("{s:?}"));
            seen.dedup();
            seen
        };
        assert_eq!(policy(), libc::SCHED_OTHER);
        let idle = at_idle_priority(|| {
            assert!(idle_priority());
            assert_eq!(policy(), libc::SCHED_IDLE);
            policies()
        });
        assert!(!idle_priority());
        assert_eq!(policy(), libc::SCHED_OTHER);
        assert!(idle.iter().all(|&(_, p)| p == libc::SCHED_IDLE), "{idle:?}");
        let normal = policies();
        assert!(
            normal.iter().all(|&(_, p)| p == libc::SCHED_OTHER),
            "{normal:?}"
        );
        let r = std::panic::catch_unwind(|| at_idle_priority(|| panic!("step failed")));
        assert!(r.is_err());
        assert_eq!(policy(), libc::SCHED_OTHER);
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
        // And still in parallel: the workers take part again (other tests' jobs may hold the
        // pool for a while, so it is tried until they do). A panic used to leave the pool's
        // lock poisoned and every later job on its caller's thread alone.
        if super::pool().is_some_and(|p| !p.threads.is_empty()) {
            let t0 = std::time::Instant::now();
            loop {
                let ids = Mutex::new(std::collections::HashSet::new());
                par_tasks(64, |_| {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    ids.lock().unwrap().insert(std::thread::current().id());
                });
                if ids.lock().unwrap().len() > 1 {
                    break;
                }
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(60),
                    "no job ran on more than one thread after a panic"
                );
            }
        }
    }

    /// The cores a thread may run on (`0`: the calling one), as a list.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn cores_of(tid: libc::pid_t) -> Vec<usize> {
        // SAFETY: the kernel writes a set of its size, which is then only read.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set),
                0
            );
            listed(&set)
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn listed(set: &libc::cpu_set_t) -> Vec<usize> {
        // SAFETY: reads a set of the kernel's size.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
            .collect()
    }

    /// Steering itself: another thread narrows a thread's cores to all but one ([`Home::avoid`],
    /// as a caller does before waking a worker), and the thread widens them back to what it
    /// had ([`Home::restore`], as the worker does once awake).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn steering_narrows_then_restores_a_threads_cores() {
        use std::sync::mpsc::channel;
        let (to_main, from_thread) = channel();
        let (to_thread, from_main) = channel::<()>();
        let t = std::thread::spawn(move || {
            let home = super::steer::Home::here();
            to_main.send((home.clone(), cores_of(0))).unwrap();
            from_main.recv().unwrap();
            if let Some(h) = &home {
                h.restore();
            }
            to_main.send((None, cores_of(0))).unwrap();
        });
        let (home, before) = from_thread.recv().unwrap();
        if let Some(h) = home {
            assert_eq!(listed(&h.cores), before);
            let avoid = before[0];
            assert!(h.avoid(avoid));
            let narrowed = cores_of(h.tid);
            assert!(
                !narrowed.contains(&avoid) && !narrowed.is_empty(),
                "{narrowed:?}"
            );
            assert_eq!(narrowed.len() + 1, before.len());
            // A core it may not run on anyway is no way to steer it.
            assert!(!h.avoid(libc::CPU_SETSIZE as usize));
        } // else one core, or steering switched off: nothing to steer.
        to_thread.send(()).unwrap();
        let (_, after) = from_thread.recv().unwrap();
        t.join().unwrap();
        assert_eq!(after, before);
    }

    /// Through the pool: a parked worker woken for a job is steered (other tests' jobs may hold
    /// the pool, so it is tried until it happens), every item runs once, and the worker is
    /// back on all its cores afterwards.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn parked_workers_woken_for_jobs_end_on_all_their_cores() {
        use std::time::{Duration, Instant};
        let Some(pool) = super::pool() else { return };
        let Some(w) = pool.threads.first() else {
            return;
        };
        let Some(home) = (0..200).find_map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            w.home.get()
        }) else {
            return; // one core, or steering switched off
        };
        let t0 = Instant::now();
        let mut seen = 0;
        while seen < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no job woke the parked worker through the pool in a minute"
            );
            // Until the worker has spun, yielded and parked.
            while !w.parked.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let before = pool.steered.load(Ordering::Relaxed);
            let hits: Vec<AtomicUsize> = (0..256).map(|_| AtomicUsize::new(0)).collect();
            super::par_ranges(256, |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            if pool.steered.load(Ordering::Relaxed) > before {
                seen += 1;
            }
            // Once awake the worker widens its cores again (other tests may steer it too:
            // wait for a moment when it is home).
            let t1 = Instant::now();
            while cores_of(home.tid) != listed(&home.cores) {
                assert!(
                    t1.elapsed() < Duration::from_secs(10),
                    "the worker kept the narrowed cores"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
