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

/// The device named `cpu`, `cuda` or `cuda:N` (transformers' `device="cuda:0"`). The errors say
/// what to do: this build has no CUDA (built without the `cuda` feature), or there is no such GPU.
pub fn device(name: &str) -> Result<Device> {
    let bad = |detail: String| Error::InvalidParameter {
        name: "device".into(),
        detail: format!("`{name}`: {detail}"),
    };
    let ordinal = match name.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad("expected cpu, cuda or cuda:N".into()))?,
    };
    if !cfg!(feature = "cuda") {
        return Err(bad(
            "this build of ferroformers has no CUDA support; build it with `--features cuda` \
             (scripts/build-cuda.sh builds one without a CUDA install)"
                .into(),
        ));
    }
    let dev = Device::new_cuda(ordinal).map_err(|e| {
        bad(format!(
            "cannot use CUDA GPU {ordinal} ({e}); `nvidia-smi` lists this machine's GPUs"
        ))
    })?;
    // cudarc gives every buffer two CUDA events by default, for ordering work across
    // streams. candle runs everything on one stream, where they are never waited on, but
    // making and destroying them costs two driver calls per tensor: hundreds per decoding step.
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &dev {
        // SAFETY: no second stream is ever made in this process (candle's device runs on the
        // calling thread's stream), so there is no cross-stream ordering for events to keep.
        unsafe { c.disable_event_tracking() }
    }
    Ok(dev)
}

/// The dtype a model runs in when none is asked for, as transformers' `torch_dtype="auto"` picks
/// on a GPU: the checkpoint's own (`torch_dtype`/`dtype` in config.json) when it is bf16 or f16,
/// else f32; a GGUF file is dequantized to f16 there (llama.cpp's GPU arithmetic). The CPU keeps
/// f32, where the fast kernels are f32 (and GGUF runs its quantized blocks).
pub fn auto_dtype(task: &str, opts: &PipelineOptions) -> DType {
    if opts.device.is_cpu() {
        return DType::F32;
    }
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => match pipelines::registry::lookup(task) {
            Ok(info) => info.default_model.to_string(),
            Err(_) => return DType::F32,
        },
    };
    let Ok(dir) = hub::resolve(&model, opts.revision.as_deref()) else {
        return DType::F32;
    };
    if generation::gguf_file(&dir).is_some() {
        return DType::F16;
    }
    let config = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    dtype_of_config(config.as_ref())
}

/// Inputs per batch on a GPU when none is asked for: a batch per kernel launch fills it (the
/// CPU's default stays 1, as transformers' pipelines).
pub const GPU_DEFAULT_BATCH: usize = 32;

/// What a caller did not ask for, filled in for `opts.device` (the CLI's `run` and `serve`): on
/// a GPU the checkpoint's dtype ([`auto_dtype`], as `pipeline(..., device=0,
/// torch_dtype="auto")`) and [`GPU_DEFAULT_BATCH`] inputs per batch; on the CPU nothing.
/// `dtype` and `batch_size` are what was asked for (`None`: not given).
pub fn fill_device_defaults(
    task: &str,
    opts: &mut PipelineOptions,
    dtype: Option<DType>,
    batch_size: Option<usize>,
) {
    if let Some(d) = dtype {
        opts.dtype = d;
    }
    if let Some(n) = batch_size {
        opts.batch_size = n;
    }
    if !opts.device.is_cpu() {
        if dtype.is_none() {
            opts.dtype = auto_dtype(task, opts);
        }
        if batch_size.is_none() {
            opts.batch_size = GPU_DEFAULT_BATCH;
        }
    }
}

/// The checkpoint dtype a config.json declares (f32 when it declares none or another).
fn dtype_of_config(config: Option<&serde_json::Value>) -> DType {
    let declared = config.and_then(|c| {
        c.get("torch_dtype")
            .or_else(|| c.get("dtype"))
            .and_then(|d| d.as_str())
    });
    match declared {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    }
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
    use candle_core::DType;
    use serde_json::json;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn device_names() {
        assert!(crate::device("cpu").unwrap().is_cpu());
        for bad in ["gpu0", "cuda:", "cuda:x", "cuda:-1", "tpu"] {
            let e = crate::device(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        for name in ["cuda", "cuda:1"] {
            let e = crate::device(name).unwrap_err().to_string();
            assert!(
                e.contains("no CUDA support") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }

    #[test]
    fn device_defaults_on_the_cpu_are_only_what_was_asked() {
        let mut opts = crate::PipelineOptions::default();
        crate::fill_device_defaults("text-generation", &mut opts, None, None);
        assert_eq!((opts.dtype, opts.batch_size), (DType::F32, 1));
        crate::fill_device_defaults("text-generation", &mut opts, Some(DType::BF16), Some(8));
        assert_eq!((opts.dtype, opts.batch_size), (DType::BF16, 8));
    }

    #[test]
    fn auto_dtype_follows_the_checkpoint_on_gpu_only() {
        use super::dtype_of_config as of;
        assert_eq!(of(Some(&json!({"torch_dtype": "bfloat16"}))), DType::BF16);
        assert_eq!(of(Some(&json!({"dtype": "float16"}))), DType::F16);
        assert_eq!(of(Some(&json!({"torch_dtype": "float32"}))), DType::F32);
        assert_eq!(of(Some(&json!({}))), DType::F32);
        assert_eq!(of(None), DType::F32);
        // The CPU keeps f32 whatever the checkpoint says.
        let opts = crate::PipelineOptions::default();
        assert_eq!(crate::auto_dtype("text-generation", &opts), DType::F32);
    }

    #[test]
    fn pipeline_is_send_sync() {
        assert_send_sync::<crate::Pipeline>();
    }
}
