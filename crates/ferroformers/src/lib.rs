//! ferroformers: Hugging Face Transformers pipelines, natively in Rust.
//!
//! ```no_run
//! let clf = ferroformers::pipeline("sentiment-analysis")?;
//! let out = clf.run_one("I love this!")?;
//! println!("{}", serde_json::to_string(&out).unwrap());
//! # Ok::<(), ferroformers::Error>(())
//! ```

pub mod audio;
pub mod config;
pub mod ctc;
pub mod error;
pub mod generation;
pub mod hub;
pub mod kernels;
pub mod models;
pub mod pipelines;
pub mod sentencepiece;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use candle_core::{DType, Device};
pub use error::{Error, Result};
pub use kernels::cpu::quantized::QuantMath;
pub use pipelines::registry::{TaskInfo, TASKS};
pub use pipelines::{
    batches_in_flight, Input, Output, Params, Pipeline, PipelineOptions, Quantize,
};

/// The pipeline for `task` (a name or alias) with its default model.
pub fn pipeline(task: &str) -> Result<Pipeline> {
    pipeline_with(task, PipelineOptions::default())
}

/// The pipeline for `task` with a model, tokenizer, device, dtype and batch size.
pub fn pipeline_with(task: &str, opts: PipelineOptions) -> Result<Pipeline> {
    tune_allocator();
    pipelines::registry::build(task, &opts)
}

/// glibc's malloc gives every buffer above 128 KiB (at first; its threshold then adapts)
/// its own `mmap` and returns freed heap tops to the kernel: a decoding step's buffers (the
/// logits of 5 beams over a 51,865-token vocabulary are 1 MB, a growing KV cache more) were
/// then mapped, faulted in page by page and unmapped again at every step, which was 60% of
/// Whisper's beam search. Buffers up to 64 MiB now come from the heap and freed memory is kept
/// for the next step (a process's memory stays near its peak instead of shrinking after it).
/// Once per process, at the first pipeline; `FERROFORMERS_NO_MALLOC_TUNING=1` leaves malloc
/// alone.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if kernels::cpu::switch_on("FERROFORMERS_NO_MALLOC_TUNING") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's thresholds; called once, before our large
        // allocations.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        }
    });
}

/// Threads the CPU kernels and batch scheduling use (rayon's pool: `RAYON_NUM_THREADS`, else
/// one per core).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn pipeline_is_send_sync() {
        assert_send_sync::<crate::Pipeline>();
    }
}
