//! The `ferroformers` binary: parses arguments, calls the library, prints one JSON per input.

mod hub_cmd;
mod serve_cmd;
mod train_cmd;

use std::io::{BufRead, Write};
use std::process::ExitCode;

use ferroformers::{DType, Device, Input, Params, PipelineOptions};
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage:
  ferroformers run TASK [--model PATH|ID] [--tokenizer PATH|ID] [--revision REV]
                        [--param KEY=VALUE]... [--batch-size N] [--threads N]
                        [--device cpu|cuda[:N]] [--dtype f32|f16|bf16]
                        [--gguf-math int8|exact] [--quantize int8]
                        [--input FILE.jsonl | --input - | TEXT...] [--timing] [--stream]
  ferroformers train TASK --model PATH|ID --train FILE [--eval FILE] --output DIR
                        [HF TrainingArguments as --options; `ferroformers train --help`]
  ferroformers serve --model PATH|ID[=TASK]... [--port 3000] [`ferroformers serve --help`]
  ferroformers tasks
  ferroformers download MODEL [--revision REV] [--file FILE]...
  ferroformers cache
  ferroformers --help | --version

`run` prints one JSON value per input, one per line, in Hugging Face's output shape.
An input line of FILE.jsonl is a JSON string or object ({\"text\":..,\"text_pair\":..}).
A --param VALUE is parsed as JSON when it parses (top_k=3, top_k=null, targets=[\"a\",\"b\"]),
else taken as a string. --timing prints load and run seconds as JSON on stderr.
A hub id missing from the cache is downloaded (HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE honoured)
unless HF_HUB_OFFLINE=1; `download` pre-fetches one and prints its folder, `cache` lists them.
--gguf-math: GGUF models on CPU round activations to 8 bits per block with integer products as
llama.cpp does (int8, the default; FERROFORMERS_GGUF_MATH sets it too), or keep them f32 for
transformers' exact numbers (exact).
--quantize int8: encoder models (BERT, DistilBERT, RoBERTa, XLM-RoBERTa) on CPU run their layers'
linear products in 8-bit integers (dynamic quantization as ONNX Runtime's quantize_dynamic does:
weights per output column at load, activations per token at run time); faster, slightly
different numbers.
`train` fine-tunes a BERT, DistilBERT, RoBERTa or XLM-RoBERTa base for text-classification,
token-classification or question-answering on a JSONL/CSV/SQuAD file and saves what
`save_pretrained` writes (Python's from_pretrained and `run` load it).
`serve` answers HTTP on 127.0.0.1: TEI's /embed and /predict, TGI's /generate, the HF Inference
API's POST / and /models/ID ({inputs, parameters}, or audio bytes), OpenAI's /v1/chat/completions,
/v1/completions (streamed too), /v1/embeddings, /v1/audio/transcriptions and /translations
(multipart; Whisper and wav2vec2) and /v1/models, /health, /info.
--dtype bf16 on CPU: encoder models run their layers' products in bf16 with f32 sums (AVX512-BF16;
f32 with a warning on CPUs without it); other models take candle's bf16 path.
--device cuda[:N] needs a build with the `cuda` feature (scripts/build-cuda.sh); there the dtype
defaults to the checkpoint's (bf16 for a bf16 checkpoint, as transformers' torch_dtype=\"auto\")
and --batch-size to 32.";

struct RunArgs {
    task: String,
    opts: PipelineOptions,
    params: Params,
    input_file: Option<String>,
    texts: Vec<String>,
    timing: bool,
    /// text-generation: print text as it is generated.
    stream: bool,
}

fn fail(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

fn parse_run(args: &[String]) -> Result<RunArgs, String> {
    let mut it = args.iter();
    let task = it
        .next()
        .filter(|t| !t.starts_with("--"))
        .ok_or_else(|| fail("`run` needs a TASK (see `ferroformers tasks`)"))?
        .clone();
    let mut opts = PipelineOptions::default();
    let mut params = Params::new();
    let mut input_file = None;
    let mut texts = Vec::new();
    let mut timing = false;
    let mut stream = false;
    let (mut dtype_given, mut batch_given) = (false, false);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| fail(format!("`{name}` needs a value")))
        };
        match a.as_str() {
            "--model" => opts.model = Some(value("--model")?),
            "--tokenizer" => opts.tokenizer = Some(value("--tokenizer")?),
            "--revision" => opts.revision = Some(value("--revision")?),
            "--batch-size" => {
                let v = value("--batch-size")?;
                opts.batch_size =
                    v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        fail(format!("--batch-size `{v}`: expected an integer >= 1"))
                    })?;
                batch_given = true;
            }
            "--threads" => {
                let v = value("--threads")?;
                let n: usize =
                    v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        fail(format!("--threads `{v}`: expected an integer >= 1"))
                    })?;
                // Read by candle's CPU kernels and rayon when their pools start.
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            "--device" => {
                let v = value("--device")?;
                opts.device = parse_device(&v)?;
            }
            "--dtype" => {
                let v = value("--dtype")?;
                opts.dtype = match v.as_str() {
                    "f32" | "float32" => DType::F32,
                    "f16" | "float16" => DType::F16,
                    "bf16" | "bfloat16" => DType::BF16,
                    _ => return Err(fail(format!("--dtype `{v}`: expected f32, f16 or bf16"))),
                };
                dtype_given = true;
            }
            "--gguf-math" => {
                let v = value("--gguf-math")?;
                opts.gguf_math =
                    Some(ferroformers::QuantMath::parse(&v).ok_or_else(|| {
                        fail(format!("--gguf-math `{v}`: expected int8 or exact"))
                    })?);
            }
            "--quantize" => {
                let v = value("--quantize")?;
                opts.quantize = Some(
                    ferroformers::Quantize::parse(&v)
                        .ok_or_else(|| fail(format!("--quantize `{v}`: expected int8")))?,
                );
            }
            "--param" => {
                let v = value("--param")?;
                let (k, raw) = v
                    .split_once('=')
                    .ok_or_else(|| fail(format!("--param `{v}`: expected KEY=VALUE")))?;
                let parsed = serde_json::from_str(raw).unwrap_or(Value::String(raw.to_string()));
                params.insert(k.to_string(), parsed);
            }
            "--input" => input_file = Some(value("--input")?),
            "--timing" => timing = true,
            "--stream" => stream = true,
            s if s.starts_with("--") => return Err(fail(format!("unknown option `{s}`\n{USAGE}"))),
            s => texts.push(s.to_string()),
        }
    }
    if !opts.device.is_cpu() {
        // On a GPU, as transformers' `torch_dtype="auto"`: the checkpoint's dtype (bf16 for a
        // bf16 checkpoint), and batches that fill it.
        if !dtype_given {
            opts.dtype = ferroformers::auto_dtype(&task, &opts);
        }
        if !batch_given {
            opts.batch_size = GPU_DEFAULT_BATCH;
        }
    }
    if input_file.is_some() && !texts.is_empty() {
        return Err(fail("give either --input FILE or TEXT arguments, not both"));
    }
    if input_file.is_none() && texts.is_empty() {
        return Err(fail("no input: give TEXT arguments or --input FILE.jsonl"));
    }
    Ok(RunArgs {
        task,
        opts,
        params,
        input_file,
        texts,
        timing,
        stream,
    })
}

/// `--stream`: text-generation printing text deltas as they are generated, one line per input.
fn run_stream(args: &RunArgs, inputs: &[Input]) -> Result<(), String> {
    let info = ferroformers::pipelines::registry::lookup(&args.task).map_err(fail)?;
    if info.name != "text-generation" {
        return Err(fail("--stream is for the text-generation task"));
    }
    let model = args.opts.model.as_deref().unwrap_or(info.default_model);
    let pipe = ferroformers::pipelines::text_generation::TextGeneration::load(&args.opts, model)
        .map_err(fail)?;
    let stdout = std::io::stdout();
    for input in inputs {
        let mut out = stdout.lock();
        let mut io_err = None;
        pipe.stream(input, &args.params, &mut |delta| {
            if let Err(e) = out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
                // The reader has gone (a closed pipe): stop generating.
                io_err.get_or_insert(e);
            }
            io_err.is_none()
        })
        .map_err(fail)?;
        if let Some(e) = io_err {
            return Err(fail(e));
        }
        writeln!(out).map_err(fail)?;
    }
    Ok(())
}

fn parse_device(v: &str) -> Result<Device, String> {
    ferroformers::device(v).map_err(|e| fail(format!("--device: {e}")))
}

/// `--batch-size` when none is given on a GPU: a batch per kernel launch fills it (the CPU's
/// default stays 1, as transformers' pipelines).
const GPU_DEFAULT_BATCH: usize = 32;

fn read_inputs(args: &RunArgs) -> Result<Vec<Input>, String> {
    let Some(file) = &args.input_file else {
        return Ok(args.texts.iter().map(|t| Input::from(t.as_str())).collect());
    };
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f =
            std::fs::File::open(file).map_err(|e| fail(format!("cannot open `{file}`: {e}")))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut inputs = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| fail(format!("reading `{file}`: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| fail(format!("`{file}` line {}: not JSON ({e})", n + 1)))?;
        inputs.push(
            Input::from_json(&v, inputs.len())
                .map_err(|e| fail(format!("`{file}` line {}: {e}", n + 1)))?,
        );
    }
    if inputs.is_empty() {
        return Err(fail(format!("`{file}` holds no inputs")));
    }
    Ok(inputs)
}

fn run(args: &[String], start: std::time::Instant) -> Result<(), String> {
    let args = parse_run(args)?;
    let inputs = read_inputs(&args)?;
    if args.stream {
        return run_stream(&args, &inputs);
    }
    let batch = args.opts.batch_size;
    let pipe = ferroformers::pipeline_with(&args.task, args.opts.clone()).map_err(fail)?;
    let loaded = start.elapsed().as_secs_f64();
    let mut first = None;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Print results as they are done: a group of batches at a time, enough for the pipeline
    // to run one batch per thread (and balance them) within each group. The first group is one
    // batch per thread, so that the first results come early.
    let wave = batch * ferroformers::num_threads();
    let (first_group, rest) = inputs.split_at(wave.min(inputs.len()));
    let group = (batch * ferroformers::batches_in_flight()).max(64);
    for chunk in std::iter::once(first_group).chain(rest.chunks(group)) {
        let results = pipe.run(chunk, &args.params).map_err(fail)?;
        for r in results {
            let line = serde_json::to_string(&r).map_err(fail)?;
            writeln!(out, "{line}").map_err(fail)?;
        }
        out.flush().map_err(fail)?;
        first.get_or_insert(start.elapsed().as_secs_f64());
    }
    if args.timing {
        let end = start.elapsed().as_secs_f64();
        eprintln!(
            "{}",
            serde_json::json!({
                "load_s": loaded,
                "run_s": end - loaded,
                "first_result_s": first,
                "inputs": inputs.len(),
            })
        );
    }
    Ok(())
}

fn tasks() {
    println!(
        "{:<26} {:<22} {:<58} status",
        "task", "aliases", "default model"
    );
    for t in ferroformers::TASKS {
        let cached = ferroformers::hub::resolve(t.default_model, Some(t.default_revision)).is_ok();
        println!(
            "{:<26} {:<22} {:<58} {}{}",
            t.name,
            t.aliases.join(","),
            t.default_model,
            if t.implemented { "ready" } else { "planned" },
            if cached { ", cached" } else { "" }
        );
    }
}

fn main() -> ExitCode {
    let start = std::time::Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..], start),
        Some("train") => train_cmd::train(&args[1..]),
        Some("serve") => serve_cmd::serve(&args[1..]),
        Some("download") => hub_cmd::download(&args[1..]),
        Some("cache") => hub_cmd::cache(&args[1..]),
        Some("tasks") => {
            tasks();
            Ok(())
        }
        Some("--version") | Some("-V") => {
            println!("ferroformers {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("--help") | Some("-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
