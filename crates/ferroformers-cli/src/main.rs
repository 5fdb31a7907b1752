//! The `ferroformers` binary: parses arguments, calls the library, prints one JSON per input.

mod hub_cmd;
mod serve_cmd;
mod train_cmd;

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use ferroformers::{DType, Device, Input, Params, PipelineOptions};
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (15 in its `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// `train`: -1 for mimalloc's `purge_delay`: freed pages are kept instead of returned to the
/// kernel, so memory freed and taken again comes back without page faults. Every step
/// allocates and frees each gradient and activation again (~12% of a MiniLM step: 35.4-35.9
/// against 39.6-40.5 samples/s). Memory then stays near its peak, which a training run
/// reaches on its first steps anyway. An explicit `MIMALLOC_PURGE_DELAY` in the environment
/// wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is thread-safe in mimalloc; 15 is purge_delay.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// `serve`: mimalloc's `purge_delay` at 60 s instead of its 1 s. Freed pages stay for the
/// next decoding steps instead of being handed back and page-faulted in again (SmolLM2 at
/// concurrency 16, against keeping all: 2-9% fewer tokens/s at 1 s, 1-3% at 60 s, which the
/// first steps after each idle spell account for), yet each is marked for purging, so that
/// [`give_back_freed_memory`] can hand them all back once the server is idle. (-1, which
/// `train` uses, marks nothing: memory then stayed at its peak, 1.1-1.3 GB after a few
/// runs of 64 chats, for good.) An explicit `MIMALLOC_PURGE_DELAY` wins.
fn purge_freed_memory_late() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: as in `keep_freed_memory`.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 60_000) };
    }
}

/// `serve`, once idle: a forced collection on every thread of the compute pool and on this
/// one hands back at once every freed page marked for purging (mimalloc only purges when some
/// thread next allocates or frees, so an idle server kept its peak). The threads that ran
/// requests have exited by then (the server's idle blocking threads do before) and handed
/// their pages to the shared arenas.
fn give_back_freed_memory() {
    // SAFETY: `mi_collect` touches the calling thread's heap and the shared arenas, which
    // mimalloc guards.
    rayon::broadcast(|_| unsafe { libmimalloc_sys::mi_collect(true) });
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// The `ferroformers` command line.
#[derive(Parser)]
#[command(
    name = "ferroformers",
    version,
    about = "Hugging Face transformers pipelines, natively: run, train and serve models",
    after_help = "`ferroformers COMMAND --help` describes each command and its options."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline on texts or a JSONL file: one JSON value per input on stdout, in Hugging
    /// Face's output shape.
    #[command(after_help = RUN_NOTES)]
    Run(RunArgs),
    /// Fine-tune a BERT, DistilBERT, RoBERTa or XLM-RoBERTa base and save what
    /// `save_pretrained` writes (Python's `from_pretrained` and `run` load it).
    Train(Box<train_cmd::TrainArgs>),
    /// Serve models over HTTP: TEI, TGI, the HF Inference API and OpenAI's routes.
    #[command(after_help = serve_cmd::NOTES)]
    Serve(serve_cmd::ServeArgs),
    /// List the tasks, their aliases and default models.
    Tasks,
    /// Fetch a model into the hub cache and print its folder.
    Download(hub_cmd::DownloadArgs),
    /// List the cached models with their refs, sizes and files.
    Cache,
    /// Print a shell completion script (e.g. `ferroformers completions bash >
    /// /etc/bash_completion.d/ferroformers`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

const RUN_NOTES: &str = "\
An input line of FILE.jsonl is a JSON string or object ({\"text\":..,\"text_pair\":..}); a text that
starts with `-` goes after `--`. A hub id missing from the cache is downloaded (HF_ENDPOINT,
HF_TOKEN, HF_HUB_CACHE honoured) unless HF_HUB_OFFLINE=1. Over a file, a progress bar shows on
stderr when it is a terminal.";

/// `ferroformers run TASK ...`.
#[derive(Args)]
struct RunArgs {
    /// The task (or an alias: `ferroformers tasks` lists them).
    #[arg(value_name = "TASK")]
    task: String,
    /// Input texts (or give --input).
    #[arg(value_name = "TEXT", conflicts_with = "input")]
    texts: Vec<String>,
    /// A model folder, GGUF file or hub id (default: the task's).
    #[arg(long, value_name = "PATH|ID")]
    model: Option<String>,
    /// The tokenizer, when not the model's.
    #[arg(long, value_name = "PATH|ID")]
    tokenizer: Option<String>,
    /// The hub revision (branch, tag or commit).
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// A pipeline parameter; VALUE is parsed as JSON when it parses (top_k=3, top_k=null,
    /// targets=["a","b"]), else taken as a string.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    params: Vec<(String, Value)>,
    /// Inputs per batch (CPU default 1, as transformers' pipelines; on a GPU 32).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: Option<u64>,
    /// Threads for the model's arithmetic (1 to 1024).
    #[arg(long, value_name = "N", value_parser = threads)]
    threads: Option<u64>,
    /// cpu, cuda or cuda:N (cuda needs a build with the `cuda` feature, scripts/build-cuda.sh).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// f32, f16 or bf16. On CPU, bf16 runs encoder models' products in bf16 with f32 sums
    /// (AVX512-BF16; f32 with a warning on CPUs without it). On a GPU the default is the
    /// checkpoint's, as transformers' torch_dtype="auto".
    #[arg(long, value_name = "DTYPE", value_parser = names(DTYPES, parse_dtype))]
    dtype: Option<DType>,
    /// GGUF models on CPU: round activations to 8 bits per block with integer products as
    /// llama.cpp does (int8, the default; FERROFORMERS_GGUF_MATH sets it too), or keep them
    /// f32 for transformers' exact numbers (exact).
    #[arg(long, value_name = "MODE",
          value_parser = names(ferroformers::QuantMath::NAMES, ferroformers::QuantMath::parse))]
    gguf_math: Option<ferroformers::QuantMath>,
    /// int8: encoder models (BERT, DistilBERT, RoBERTa, XLM-RoBERTa) on CPU run their linear
    /// products in 8-bit integers (dynamic quantization, as ONNX Runtime's quantize_dynamic);
    /// faster, slightly different numbers.
    #[arg(long, value_name = "MODE",
          value_parser = names(ferroformers::Quantize::NAMES, ferroformers::Quantize::parse))]
    quantize: Option<ferroformers::Quantize>,
    /// Read inputs from a JSONL file (`-`: standard input).
    #[arg(long, value_name = "FILE.jsonl")]
    input: Option<String>,
    /// Print load and run seconds as JSON on stderr.
    #[arg(long)]
    timing: bool,
    /// Run every input once, untimed and unprinted, before the pass that is printed and timed
    /// (as benchmarks warm their peers: first-use costs such as a GPU's kernel loading and
    /// library set-up are left out of `run_s`, and reported as `warmup_s`).
    #[arg(long, conflicts_with = "stream")]
    warmup: bool,
    /// text-generation: print text as it is generated.
    #[arg(long)]
    stream: bool,
    /// text-generation: batch-invariant arithmetic, as `serve` runs it, so that the tokens are
    /// the ones a server gives the same request under any load. auto (the default): where it
    /// costs no speed, in the int8 mode on CPUs with AVX-512 VNNI (on AMD's cores GGUF
    /// matrices all Q8_0, or Q4_0, Q4_1 or Q4_K of at most 2 MiB, as SmolLM2-135M's Q4_1 file;
    /// on Intel's every type but Q2_K and Q3_K); true: a model without it fails, saying why;
    /// false: never.
    #[arg(long, value_name = "auto|true|false", default_value = "auto",
          value_parser = auto_bool)]
    batch_invariant: AutoBool,
}

/// A flag that is `auto` (`None`), `true` or `false` (`--batch-invariant`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AutoBool(pub(crate) Option<bool>);

/// `--batch-invariant`'s values.
pub(crate) fn auto_bool(v: &str) -> Result<AutoBool, String> {
    match v {
        "auto" => Ok(AutoBool(None)),
        "true" => Ok(AutoBool(Some(true))),
        "false" => Ok(AutoBool(Some(false))),
        _ => Err(format!("`{v}` is not auto, true or false")),
    }
}

/// An error of `--batch-invariant`, naming the flag.
fn invariance_error(e: ferroformers::Error) -> String {
    fail(format!("--batch-invariant: {e}"))
}

/// `--dtype`'s spellings, as [`parse_dtype`] reads them.
const DTYPES: &[&str] = &["f32", "float32", "f16", "float16", "bf16", "bfloat16"];

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "f32" | "float32" => Some(DType::F32),
        "f16" | "float16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// A value parser that offers `names` (listed in `--help`, with clap's suggestions for typos)
/// and gives what `parse` makes of the one chosen: one list for the CLI and the library.
fn names<T: Clone + Send + Sync + 'static>(
    names: &'static [&'static str],
    parse: fn(&str) -> Option<T>,
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).try_map(move |s: String| {
        parse(&s).ok_or_else(|| format!("`{s}` is not one of {}", names.join(", ")))
    })
}

/// The most `--threads` a command takes: rayon starts every thread asked for up front, and
/// far more than any machine's cores (100000, or 2^64-1) left the process starting threads
/// for minutes instead of failing.
const MAX_THREADS: u64 = 1024;

/// `--threads N` (`run`, `train`, `serve`): 1 to [`MAX_THREADS`].
fn threads(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|n| (1..=MAX_THREADS).contains(n))
        .ok_or_else(|| format!("takes a number of threads from 1 to {MAX_THREADS}, not `{v}`"))
}

/// `--param KEY=VALUE`.
fn parse_param(v: &str) -> Result<(String, Value), String> {
    let (k, raw) = v
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, not `{v}`"))?;
    let parsed = serde_json::from_str(raw).unwrap_or(Value::String(raw.to_string()));
    Ok((k.to_string(), parsed))
}

/// What a `run` needs once its options are checked.
struct Run {
    task: String,
    opts: PipelineOptions,
    params: Params,
    input_file: Option<String>,
    texts: Vec<String>,
    timing: bool,
    warmup: bool,
    stream: bool,
    batch_invariant: Option<bool>,
}

fn fail(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

/// What a command returns when its stdout's reader has gone: `main` ends quietly, with
/// status 0.
const STDOUT_CLOSED: &str = "(stdout closed)";

/// A failed write to stdout. A closed pipe (`ferroformers tasks | head -1`) means the rest
/// of the output is not wanted: the command stops there and ends quietly, as Unix tools that
/// SIGPIPE ends (Rust ignores SIGPIPE, so the write reports it instead; `println!` panicked
/// on it). Any other failure (a full disk) is an error.
fn stdout_error(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        STDOUT_CLOSED.to_string()
    } else {
        format!("cannot write to stdout: {e}")
    }
}

fn check_run(a: RunArgs) -> Result<Run, String> {
    let mut opts = PipelineOptions {
        model: a.model,
        tokenizer: a.tokenizer,
        revision: a.revision,
        ..PipelineOptions::default()
    };
    if let Some(n) = a.threads {
        // Read by candle's CPU kernels and rayon when their pools start.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if let Some(d) = &a.device {
        opts.device = parse_device(d)?;
    }
    opts.gguf_math = a.gguf_math;
    opts.quantize = a.quantize;
    // On a GPU, as transformers' `torch_dtype="auto"`: the checkpoint's dtype (bf16 for a bf16
    // checkpoint), and batches that fill it.
    ferroformers::fill_device_defaults(
        &a.task,
        &mut opts,
        a.dtype,
        a.batch_size.map(|n| n as usize),
    );
    if a.input.is_none() && a.texts.is_empty() {
        return Err(fail("no input: give TEXT arguments or --input FILE.jsonl"));
    }
    Ok(Run {
        task: a.task,
        opts,
        params: a.params.into_iter().collect(),
        input_file: a.input,
        texts: a.texts,
        timing: a.timing,
        warmup: a.warmup,
        stream: a.stream,
        batch_invariant: a.batch_invariant.0,
    })
}

/// `--stream`: text-generation printing text deltas as they are generated, one line per input.
fn run_stream(args: &Run, read: &Inputs) -> Result<(), String> {
    let info = ferroformers::pipelines::registry::lookup(&args.task).map_err(fail)?;
    if info.name != "text-generation" {
        return Err(fail("--stream is for the text-generation task"));
    }
    let model = args.opts.model.as_deref().unwrap_or(info.default_model);
    let mut pipe =
        ferroformers::pipelines::text_generation::TextGeneration::load(&args.opts, model)
            .map_err(fail)?;
    pipe.set_batch_invariance(args.batch_invariant)
        .map_err(invariance_error)?;
    let stdout = std::io::stdout();
    for (k, input) in read.inputs.iter().enumerate() {
        let mut out = stdout.lock();
        let mut io_err = None;
        pipe.stream(input, &args.params, &mut |delta| {
            if let Err(e) = out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
                // The reader has gone (a closed pipe): stop generating.
                io_err.get_or_insert(e);
            }
            io_err.is_none()
        })
        .map_err(|e| read.error(args, k, e))?;
        if let Some(e) = io_err {
            return Err(stdout_error(e));
        }
        writeln!(out).map_err(stdout_error)?;
    }
    Ok(())
}

fn parse_device(v: &str) -> Result<Device, String> {
    ferroformers::device(v).map_err(|e| fail(format!("--device: {e}")))
}

/// The inputs, and for `--input` each one's line in the file (1-based).
struct Inputs {
    inputs: Vec<Input>,
    lines: Vec<usize>,
}

impl Inputs {
    /// A pipeline's error for the inputs from `offset` on (a group of them, or one streamed):
    /// an invalid input is named by its file and line (`--input`) or by its place among all
    /// the inputs (the pipeline counts within what it was given).
    fn error(&self, args: &Run, offset: usize, e: ferroformers::Error) -> String {
        match e {
            ferroformers::Error::InvalidInput { index, detail } => {
                let at = offset + index;
                match (&args.input_file, self.lines.get(at)) {
                    (Some(file), Some(line)) => format!("`{file}` line {line}: {detail}"),
                    _ => format!("invalid input #{at}: {detail}"),
                }
            }
            e => e.to_string(),
        }
    }
}

/// One line of `file` as text: a UTF-8 byte-order mark at the start of the file is skipped
/// (as Python's `utf-8-sig` and HF datasets' JSON reader do), a UTF-16 one or bytes that are
/// not UTF-8 are an error naming the line.
fn input_line(file: &str, n: usize, bytes: Vec<u8>) -> Result<String, String> {
    let bytes = match bytes.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) if n == 1 => rest.to_vec(),
        _ => bytes,
    };
    if n == 1 && (bytes.starts_with(b"\xff\xfe") || bytes.starts_with(b"\xfe\xff")) {
        return Err(fail(format!(
            "`{file}` is UTF-16 text (it starts with a UTF-16 byte-order mark): JSONL input \
             must be UTF-8"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let column = String::from_utf8_lossy(&e.as_bytes()[..at]).chars().count() + 1;
        fail(format!(
            "`{file}` line {n}: not UTF-8 text (an invalid byte at column {column}); JSONL \
             input must be UTF-8"
        ))
    })
}

fn read_inputs(args: &Run) -> Result<Inputs, String> {
    let Some(file) = &args.input_file else {
        return Ok(Inputs {
            inputs: args.texts.iter().map(|t| Input::from(t.as_str())).collect(),
            lines: Vec::new(),
        });
    };
    let mut reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f =
            std::fs::File::open(file).map_err(|e| fail(format!("cannot open `{file}`: {e}")))?;
        Box::new(std::io::BufReader::new(f))
    };
    let (mut inputs, mut lines) = (Vec::new(), Vec::new());
    for n in 1.. {
        let mut bytes = Vec::new();
        let read = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| fail(format!("reading `{file}`: {e}")))?;
        if read == 0 {
            break;
        }
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        let line = input_line(file, n, bytes)?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| fail(format!("`{file}` line {n}: not JSON ({e})")))?;
        inputs.push(
            Input::from_json(&v, inputs.len())
                .map_err(|e| fail(format!("`{file}` line {n}: {e}")))?,
        );
        lines.push(n);
    }
    if inputs.is_empty() {
        return Err(fail(format!("`{file}` holds no inputs")));
    }
    Ok(Inputs { inputs, lines })
}

fn run(args: RunArgs, start: std::time::Instant) -> Result<(), String> {
    let args = check_run(args)?;
    let read = read_inputs(&args)?;
    if args.stream {
        return run_stream(&args, &read);
    }
    let inputs = &read.inputs;
    let batch = args.opts.batch_size;
    let mut pipe = ferroformers::pipeline_with(&args.task, args.opts.clone()).map_err(fail)?;
    // (Other tasks: never under auto; `true` fails, saying only text generation has it.)
    let invariant = pipe
        .set_batch_invariance(args.batch_invariant)
        .map_err(invariance_error)?;
    let loaded = start.elapsed().as_secs_f64();
    let warmup = if args.warmup {
        pipe.run(inputs, &args.params)
            .map_err(|e| read.error(&args, 0, e))?;
        Some(start.elapsed().as_secs_f64() - loaded)
    } else {
        None
    };
    // The timed pass starts here.
    let timed = loaded + warmup.unwrap_or(0.0);
    let mut first = None;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Print results as they are done: a group of batches at a time, enough for the pipeline
    // to run one batch per thread (and balance them) within each group. The first group is one
    // batch per thread, so that the first results come early.
    let wave = batch * ferroformers::num_threads();
    let (first_group, rest) = inputs.split_at(wave.min(inputs.len()));
    let group = (batch * ferroformers::batches_in_flight()).max(64);
    let bar = progress_bar(&args, inputs.len());
    let mut offset = 0;
    for chunk in std::iter::once(first_group).chain(rest.chunks(group)) {
        let results = pipe
            .run(chunk, &args.params)
            .map_err(|e| read.error(&args, offset, e))?;
        offset += chunk.len();
        for r in results {
            let line = serde_json::to_string(&r).map_err(fail)?;
            writeln!(out, "{line}").map_err(stdout_error)?;
        }
        out.flush().map_err(stdout_error)?;
        bar.inc(chunk.len() as u64);
        first.get_or_insert(start.elapsed().as_secs_f64());
    }
    bar.finish_and_clear();
    if args.timing {
        let end = start.elapsed().as_secs_f64();
        eprintln!(
            "{}",
            serde_json::json!({
                "load_s": loaded,
                "warmup_s": warmup,
                "run_s": end - timed,
                "first_result_s": first,
                "inputs": inputs.len(),
                "batch_invariant": invariant,
            })
        );
    }
    Ok(())
}

/// A run over a file: inputs done, rate and time left on stderr, drawn only when stderr is a
/// terminal (and cleared at the end, so a terminal keeps only the results).
fn progress_bar(args: &Run, inputs: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if args.input_file.is_none() || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(inputs as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} inputs [{elapsed_precise}<{eta_precise}]",
    ) {
        bar.set_style(style.progress_chars("##-"));
    }
    bar
}

fn tasks() -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<26} {:<22} {:<58} status",
        "task", "aliases", "default model"
    )
    .map_err(stdout_error)?;
    for t in ferroformers::TASKS {
        let cached = ferroformers::hub::resolve(t.default_model, Some(t.default_revision)).is_ok();
        writeln!(
            out,
            "{:<26} {:<22} {:<58} {}{}",
            t.name,
            t.aliases.join(","),
            t.default_model,
            if t.implemented { "ready" } else { "planned" },
            if cached { ", cached" } else { "" }
        )
        .map_err(stdout_error)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let start = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and succeed; a usage error prints clap's message
            // (`error: ...`, with a suggestion for a typo) and exits 1, as every other error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Some(Command::Run(a)) => run(a, start),
        Some(Command::Train(a)) => train_cmd::train(*a),
        Some(Command::Serve(a)) => serve_cmd::serve(a),
        Some(Command::Download(a)) => hub_cmd::download(a),
        Some(Command::Cache) => hub_cmd::cache(),
        Some(Command::Tasks) => tasks(),
        Some(Command::Completions { shell }) => {
            // clap_complete panics when its writer fails: it writes to memory here.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferroformers", &mut script);
            std::io::stdout().write_all(&script).map_err(stdout_error)
        }
        None => Cli::command().print_help().map_err(stdout_error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e == STDOUT_CLOSED => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
