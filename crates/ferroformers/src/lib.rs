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
    pipelines::registry::build(task, &opts)
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
