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

/// A buffer's base pointer handed to parallel jobs that each write their own disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for writes to disjoint parts of one buffer.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
