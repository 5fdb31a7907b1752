//! `ferroformers._ferroformers`: the Rust side of the Python package.
//!
//! The Python layer (`python/ferroformers/__init__.py`) gives `pipeline()` transformers'
//! calling conventions (one input or a list, call-time keyword arguments, the nesting of the
//! results); this module runs the engine. Inputs, parameters and outputs cross as JSON text
//! (the CLI's input lines and output values), so both sides share one definition of every
//! task's shapes. The GIL is released while a pipeline loads or runs, so Python threads run
//! pipelines in parallel; a pipeline is shared between threads as is.

use std::sync::mpsc;
use std::sync::Arc;

use ferroformers::{
    DType, Device, Input, Output, Params, Pipeline, PipelineOptions, QuantMath, Quantize,
};
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyError, PyOSError, PyRuntimeError, PyStopIteration, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use serde_json::Value;

/// A library error as the Python exception transformers raises in the same situation, with
/// the CLI's message: an unknown task is a `KeyError`, a missing model an `OSError` (a missing
/// file in a model folder a `FileNotFoundError`), bad inputs and parameters `ValueError`.
fn py_err(e: ferroformers::Error) -> PyErr {
    use ferroformers::Error as E;
    let msg = e.to_string();
    match e {
        E::UnknownTask { .. } => PyKeyError::new_err(msg),
        E::MissingFile { .. } => PyFileNotFoundError::new_err(msg),
        E::ModelNotFound { .. }
        | E::Download { .. }
        | E::Io { .. }
        | E::Write { .. }
        | E::InvalidFile { .. }
        | E::Weights { .. } => PyOSError::new_err(msg),
        E::UnsupportedModel { .. }
        | E::UnknownParameter { .. }
        | E::InvalidParameter { .. }
        | E::InvalidInput { .. }
        | E::Tokenizer(_)
        | E::Audio { .. } => PyValueError::new_err(msg),
        E::Tensor(_) => PyRuntimeError::new_err(msg),
    }
}

fn json_err(what: &str, e: serde_json::Error) -> PyErr {
    PyValueError::new_err(format!("{what}: not valid JSON ({e})"))
}

/// `"cpu"`, `"cuda"`, `"cuda:N"` or an ordinal (`-1` is the CPU), as transformers' `device`.
fn parse_device(device: Option<&Bound<'_, PyAny>>) -> PyResult<Device> {
    let Some(d) = device.filter(|d| !d.is_none()) else {
        return Ok(Device::Cpu);
    };
    let cuda = |ordinal: usize| {
        ferroformers::device(&format!("cuda:{ordinal}"))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    };
    if let Ok(n) = d.extract::<i64>() {
        return match n {
            -1 => Ok(Device::Cpu),
            n if n >= 0 => cuda(n as usize),
            n => Err(PyValueError::new_err(format!(
                "device {n}: expected -1 (CPU) or a GPU ordinal >= 0"
            ))),
        };
    }
    let s: String = d.str()?.extract()?;
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        s if s.starts_with("cuda:") => match s["cuda:".len()..].parse::<usize>() {
            Ok(n) => cuda(n),
            Err(_) => Err(PyValueError::new_err(format!(
                "device `{s}`: expected \"cpu\", \"cuda\" or \"cuda:N\""
            ))),
        },
        other => Err(PyValueError::new_err(format!(
            "device `{other}`: expected \"cpu\", \"cuda\", \"cuda:N\" or an ordinal"
        ))),
    }
}

/// transformers' dtype spellings (`"float32"`, `"bfloat16"`, `"torch.float16"`, `"auto"`, ...).
fn parse_dtype(dtype: Option<&str>) -> PyResult<Option<DType>> {
    let Some(s) = dtype else {
        return Ok(None);
    };
    let s = s.strip_prefix("torch.").unwrap_or(s);
    Ok(Some(match s {
        // The device's default: f32 on the CPU, the checkpoint's on a GPU.
        "auto" => return Ok(None),
        "float32" | "float" | "f32" | "fp32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "half" | "f16" | "fp16" => DType::F16,
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype `{other}`: expected float32, bfloat16, float16 or auto"
            )))
        }
    }))
}

/// One loaded pipeline. Shared between Python threads as is (the engine is `Send + Sync`).
#[pyclass(frozen, module = "ferroformers._ferroformers")]
struct Engine {
    pipe: Arc<Pipeline>,
}

#[pymethods]
impl Engine {
    /// Load the pipeline for `task` (a name or alias; inferred from the model's files when
    /// `None`). The GIL is released while the model loads.
    #[new]
    #[pyo3(signature = (task=None, model=None, tokenizer=None, revision=None, device=None, dtype=None, batch_size=None, gguf_math=None, quantize=None, continuous_batching=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        task: Option<String>,
        model: Option<String>,
        tokenizer: Option<String>,
        revision: Option<String>,
        device: Option<&Bound<'_, PyAny>>,
        dtype: Option<String>,
        batch_size: Option<usize>,
        gguf_math: Option<String>,
        quantize: Option<String>,
        continuous_batching: Option<usize>,
    ) -> PyResult<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype.as_deref())?;
        if batch_size == Some(0) {
            return Err(PyValueError::new_err(
                "batch_size: expected an integer >= 1",
            ));
        }
        let gguf_math = gguf_math
            .map(|s| {
                QuantMath::parse(&s).ok_or_else(|| {
                    PyValueError::new_err(format!("gguf_math `{s}`: expected int8 or exact"))
                })
            })
            .transpose()?;
        let quantize = quantize
            .map(|s| {
                Quantize::parse(&s)
                    .ok_or_else(|| PyValueError::new_err(format!("quantize `{s}`: expected int8")))
            })
            .transpose()?;
        let mut opts = PipelineOptions {
            model,
            tokenizer,
            revision,
            device,
            gguf_math,
            quantize,
            ..Default::default()
        };
        if continuous_batching == Some(0) {
            return Err(PyValueError::new_err(
                "continuous_batching: expected a token budget >= 1",
            ));
        }
        let mut pipe = py
            .detach(|| {
                let task = match task {
                    Some(t) => t,
                    None => infer(&opts)?,
                };
                // As `ferroformers run`: on a GPU the checkpoint's dtype and batches of 32
                // unless asked otherwise; on the CPU f32 and one input at a time.
                ferroformers::fill_device_defaults(&task, &mut opts, dtype, batch_size);
                ferroformers::pipeline_with(&task, opts)
            })
            .map_err(py_err)?;
        if let Some(budget) = continuous_batching {
            if !pipe.enable_continuous_batching(budget) {
                return Err(PyValueError::new_err(format!(
                    "continuous_batching is for text-generation, not {}",
                    pipe.task()
                )));
            }
        }
        Ok(Engine {
            pipe: Arc::new(pipe),
        })
    }

    /// The canonical task name.
    #[getter]
    fn task(&self) -> String {
        self.pipe.task().to_string()
    }

    /// Run on `inputs` (a JSON array of the CLI's input values) with `params` (a JSON object
    /// of call parameters); returns a JSON array, one output per input, each in the shape
    /// transformers returns for that input called alone. The GIL is released meanwhile.
    fn run(&self, py: Python<'_>, inputs: &str, params: &str) -> PyResult<String> {
        let (inputs, params) = parse_call(inputs, params)?;
        let pipe = Arc::clone(&self.pipe);
        py.detach(move || {
            let outs = pipe.run(&inputs, &params).map_err(py_err)?;
            serde_json::to_string(&outs).map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
    }

    /// `run` for the tasks whose outputs are arrays (feature-extraction, sentence-embeddings):
    /// per input, its f32 values as a `bytearray` (native byte order) and their shape, for
    /// `numpy.frombuffer`: no JSON and no per-float Python objects.
    fn run_arrays<'py>(
        &self,
        py: Python<'py>,
        inputs: &str,
        params: &str,
    ) -> PyResult<Vec<(Bound<'py, PyByteArray>, Vec<usize>)>> {
        let (inputs, params) = parse_call(inputs, params)?;
        let pipe = Arc::clone(&self.pipe);
        let arrays = py.detach(move || -> PyResult<Vec<(Vec<u8>, Vec<usize>)>> {
            let outs = pipe.run(&inputs, &params).map_err(py_err)?;
            outs.into_iter().map(array_of).collect()
        })?;
        Ok(arrays
            .into_iter()
            .map(|(bytes, shape)| (PyByteArray::new(py, &bytes), shape))
            .collect())
    }

    /// Text generation for one input, token by token: an iterator of text pieces (the
    /// `TextIteratorStreamer` pattern) whose last item is the whole output as JSON, marked
    /// by the iterator's `done` flag. Generation runs on its own thread; dropping the iterator
    /// stops it after the current token.
    fn stream(&self, input: &str, params: &str) -> PyResult<Stream> {
        let input: Value = serde_json::from_str(input).map_err(|e| json_err("input", e))?;
        let (mut inputs, params) = parse_call(&Value::Array(vec![input]).to_string(), params)?;
        let Some(input) = inputs.pop() else {
            return Err(PyValueError::new_err("stream: one input expected"));
        };
        let pipe = Arc::clone(&self.pipe);
        let (tx, rx) = mpsc::channel::<Piece>();
        std::thread::spawn(move || {
            let mut on_token = |ev: &ferroformers::pipelines::text_generation::TokenEvent| {
                if ev.special || ev.text.is_empty() {
                    return true;
                }
                // A closed channel means the reader has gone: stop generating.
                tx.send(Piece::Text(ev.text.to_string())).is_ok()
            };
            let end = match pipe.run_streaming(&input, &params, &mut on_token) {
                Ok((out, _usage)) => match serde_json::to_string(&out) {
                    Ok(s) => Piece::Done(s),
                    Err(e) => Piece::Failed(PyRuntimeError::new_err(e.to_string())),
                },
                Err(e) => Piece::Failed(py_err(e)),
            };
            let _ = tx.send(end);
        });
        Ok(Stream {
            rx: std::sync::Mutex::new(Some(rx)),
            output: std::sync::Mutex::new(None),
        })
    }
}

/// An array output's f32 values (native byte order) and shape.
fn array_of(out: Output) -> PyResult<(Vec<u8>, Vec<usize>)> {
    let (values, shape) = match out {
        Output::Embedding(v) => {
            let n = v.len();
            (v, vec![n])
        }
        Output::Features(f) => {
            let (a, b) = (f.len(), f.first().map_or(0, Vec::len));
            let c = f.first().and_then(|r| r.first()).map_or(0, Vec::len);
            let flat: Vec<f32> = f.into_iter().flatten().flatten().collect();
            if flat.len() != a * b * c {
                return Err(PyRuntimeError::new_err("feature rows of unequal lengths"));
            }
            (flat, vec![a, b, c])
        }
        _ => {
            return Err(PyValueError::new_err(
                "return_tensors: only feature-extraction and sentence-embeddings give arrays",
            ))
        }
    };
    let bytes = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    Ok((bytes, shape))
}

fn parse_call(inputs: &str, params: &str) -> PyResult<(Vec<Input>, Params)> {
    let inputs: Value = serde_json::from_str(inputs).map_err(|e| json_err("inputs", e))?;
    let Value::Array(items) = inputs else {
        return Err(PyValueError::new_err("inputs: expected a JSON array"));
    };
    let inputs = items
        .iter()
        .enumerate()
        .map(|(i, v)| Input::from_json(v, i))
        .collect::<ferroformers::Result<Vec<_>>>()
        .map_err(py_err)?;
    let params: Value = serde_json::from_str(params).map_err(|e| json_err("params", e))?;
    let Value::Object(params) = params else {
        return Err(PyValueError::new_err("params: expected a JSON object"));
    };
    Ok((inputs, params))
}

/// The task a model was made for, from its files (`pipeline(model=...)` without a task).
fn infer(opts: &PipelineOptions) -> ferroformers::Result<String> {
    let Some(model) = &opts.model else {
        return Err(ferroformers::Error::InvalidParameter {
            name: "task".into(),
            detail: "give a task, a model, or both".into(),
        });
    };
    let dir = ferroformers::hub::resolve_or_download(model, opts.revision.as_deref())?;
    ferroformers::pipelines::registry::infer_task(&dir)
        .map(str::to_string)
        .ok_or_else(|| ferroformers::Error::InvalidParameter {
            name: "task".into(),
            detail: format!(
                "cannot tell the task of `{model}` from its files (no known `architectures` \
                 in its config): give the task"
            ),
        })
}

enum Piece {
    Text(String),
    Done(String),
    Failed(PyErr),
}

/// The iterator [`Engine::stream`] returns: text pieces, then `StopIteration`; `output` holds
/// the whole result (JSON) once the generation has ended.
#[pyclass(module = "ferroformers._ferroformers")]
struct Stream {
    rx: std::sync::Mutex<Option<mpsc::Receiver<Piece>>>,
    output: std::sync::Mutex<Option<String>>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        let mut guard = self
            .rx
            .lock()
            .map_err(|_| PyRuntimeError::new_err("stream poisoned"))?;
        let Some(rx) = guard.take() else {
            return Err(PyStopIteration::new_err(()));
        };
        // Wait for the next piece without holding the GIL.
        let (piece, rx) = py.detach(move || (rx.recv(), rx));
        match piece {
            Ok(Piece::Text(t)) => {
                *guard = Some(rx);
                Ok(t)
            }
            Ok(Piece::Done(out)) => {
                if let Ok(mut o) = self.output.lock() {
                    *o = Some(out);
                }
                Err(PyStopIteration::new_err(()))
            }
            Ok(Piece::Failed(e)) => Err(e),
            Err(_) => Err(PyRuntimeError::new_err(
                "the generation thread ended without a result",
            )),
        }
    }

    /// The whole output as JSON once the iterator is exhausted, else `None`.
    #[getter]
    fn output(&self) -> Option<String> {
        self.output.lock().ok().and_then(|o| o.clone())
    }
}

/// Download `model` (a hub id) into the Hugging Face cache, or find it there or on disk;
/// returns its local folder.
#[pyfunction]
#[pyo3(signature = (model, revision=None))]
fn download(py: Python<'_>, model: String, revision: Option<String>) -> PyResult<String> {
    let dir = py
        .detach(|| ferroformers::hub::resolve_or_download(&model, revision.as_deref()))
        .map_err(py_err)?;
    Ok(dir.to_string_lossy().into_owned())
}

/// Every implemented task with its aliases and default model: `[(name, aliases, model)]`.
#[pyfunction]
fn tasks() -> Vec<(String, Vec<String>, String)> {
    ferroformers::TASKS
        .iter()
        .filter(|t| t.implemented)
        .map(|t| {
            (
                t.name.to_string(),
                t.aliases.iter().map(|a| a.to_string()).collect(),
                t.default_model.to_string(),
            )
        })
        .collect()
}

/// Whether this build has the `cuda` feature (`device="cuda"` can work).
#[pyfunction]
fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

#[pymodule]
fn _ferroformers(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Stream>()?;
    m.add_function(wrap_pyfunction!(download, m)?)?;
    m.add_function(wrap_pyfunction!(tasks, m)?)?;
    m.add_function(wrap_pyfunction!(built_with_cuda, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
