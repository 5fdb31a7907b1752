//! The hand-written compute the models run on: what makes inference fast, kept apart from what
//! a model *is* (its config, weights and layers live in `models`).
//!
//! Kernels work over plain buffers (and, for the quantized blocks, candle's `QTensor`): they
//! know nothing of models, generation or pipelines. The arrows point one way: pipelines ->
//! models/generation -> kernels.
//!
//! - [`cpu`]: f32 and quantized kernels for the CPU (products, attention, norms, activations,
//!   GGUF block dots, SIMD dispatch, worker threads).
//!
//! A GPU kernel of our own (beside candle's) would go in a `gpu/` module next to `cpu/`.

pub mod cpu;
