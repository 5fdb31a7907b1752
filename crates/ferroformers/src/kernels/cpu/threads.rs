//! How the CPU kernels share the machine: worker mode, where a pipeline runs one batch per core
//! and each batch's products stay on its own thread, and the pointer parallel jobs write
//! through.

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

/// `f(0)`, ..., `f(n - 1)` spread over the threads, on candle's barrier pool: its workers
/// spin briefly between calls, so the dozens of split steps of one forward pass (products,
/// attention, row loops) do not each pay a sleep and wake-up, as rayon's hand-offs did
/// (`perf` on one MiniLM sentence: a quarter of the time in the scheduler, 2.9 -> 1.5 ms).
/// Inside a worker (one batch per core), or with one task, on the calling thread.
///
/// A task that splits again runs that split inline: the pool's own threads do so by
/// themselves, and the calling thread (which takes a share of the tasks while holding the
/// pool's lock) is marked here.
pub fn par_tasks(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 || in_worker() || IN_TASKS.with(|t| t.get()) {
        (0..n).for_each(f);
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
    candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
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
}
