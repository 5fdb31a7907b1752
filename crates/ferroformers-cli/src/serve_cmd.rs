//! `ferroformers serve --model ID[=TASK] ...`: options into `ferroformers_server::Config`.
//! Every option also reads the environment variable TEI and TGI read for it (`MODEL_ID`,
//! `PORT`, `HOSTNAME`, `MAX_BATCH_TOTAL_TOKENS`, ...); a flag on the command line wins.

use clap::Args;
use ferroformers_server::{Config, ModelSpec};

pub const NOTES: &str = "\
Each option falls back to the environment variable shown, as TEI's and TGI's do; the command
line wins. --payload-limit bounds every body, audio files included: 2 MB holds ~60 s of 16 kHz
16-bit WAV (11 s of 44.1 kHz stereo); OpenAI takes files up to 25 MB (--payload-limit
26214400). Logs: one line per request on stderr; RUST_LOG filters them (e.g.
RUST_LOG=ferroformers_server=warn), --json-output makes them JSON.";

/// `ferroformers serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// A model folder, GGUF file or hub id, with `=TASK` to name its task (else from its
    /// config); repeat for several models (the first is the default).
    #[arg(
        long,
        visible_alias = "model-id",
        env = "MODEL_ID",
        value_name = "PATH|ID[=TASK]",
        required = true
    )]
    model: Vec<String>,
    /// The first model's name in /v1/models and /info (default: its id).
    #[arg(long, env, value_name = "NAME")]
    served_model_name: Option<String>,
    /// The address to listen on (0.0.0.0 for every interface).
    #[arg(long, env, default_value_t = Config::default().hostname)]
    hostname: String,
    /// The port to listen on (0: any free one).
    #[arg(long, short, env, default_value_t = Config::default().port, allow_negative_numbers = true)]
    port: u16,
    /// A bearer token every route but the probes and metrics requires.
    #[arg(long, env, value_name = "KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The largest request body, in bytes (413 above it).
    #[arg(long, env, value_name = "BYTES", default_value_t = Config::default().payload_limit, allow_negative_numbers = true)]
    payload_limit: usize,
    /// The most inputs one request may hold (413 above it).
    #[arg(long, env, value_name = "N", default_value_t = Config::default().max_client_batch_size, allow_negative_numbers = true)]
    max_client_batch_size: usize,
    /// Encoder tasks: the most inputs that requests merged into one batch may hold together
    /// (TEI's --max-batch-requests).
    #[arg(long, visible_alias = "max-batch-requests", env = "MAX_BATCH_REQUESTS", value_name = "N",
          default_value_t = Config::default().max_batch_inputs, allow_negative_numbers = true)]
    max_batch_inputs: usize,
    /// Encoder tasks: the most tokens (each input's, after truncation) that requests merged
    /// into one batch may hold together (TEI's --max-batch-tokens); a request over it by
    /// itself runs alone.
    #[arg(long, env, value_name = "TOKENS", default_value_t = Config::default().max_batch_tokens, allow_negative_numbers = true)]
    max_batch_tokens: usize,
    /// Encoder routes: inputs longer than the model's limit are cut (true) or refused with 422
    /// (false) when a request does not say `truncate` (TEI's --auto-truncate, whose default is
    /// false).
    #[arg(long, env, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          default_value_t = Config::default().auto_truncate, action = clap::ArgAction::Set)]
    auto_truncate: bool,
    /// Encoder tasks: how long a batch's first request waits for others to join.
    #[arg(
        long,
        env,
        value_name = "MS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    max_batch_wait_ms: u64,
    /// Generation: the tokens (prompt plus max_new_tokens each) the sequences of one
    /// continuously batched model may hold together; 0 turns continuous batching off.
    #[arg(long, env, value_name = "TOKENS", default_value_t = Config::default().max_batch_total_tokens, allow_negative_numbers = true)]
    max_batch_total_tokens: usize,
    /// Generation: waiting requests join the running batch at the latest after this many
    /// decoding steps (TGI's rule).
    #[arg(long, env, value_name = "STEPS",
          default_value_t = Config::default().admission.max_waiting_tokens, allow_negative_numbers = true)]
    max_waiting_tokens: usize,
    /// Generation: waiting requests join once there are at least running x RATIO of them
    /// (TGI: 1.2; ours 0: at the next step).
    #[arg(long, env, value_name = "RATIO", value_parser = ratio,
          default_value_t = Config::default().admission.waiting_served_ratio, allow_negative_numbers = true)]
    waiting_served_ratio: f32,
    /// Generation: a new request's prompt runs as soon as it arrives, between two layers of
    /// a running decoding step (its first token waits for one prompt pass, not for the
    /// step); false: at the next step, a repeated prompt riding along in it (more tokens/s,
    /// later first tokens under load). A waiting-served ratio above 0 turns it off.
    #[arg(long, env, value_name = "BOOL",
          default_value_t = Config::default().admission.prefill_priority, action = clap::ArgAction::Set)]
    prefill_priority: bool,
    /// Generation: decoding steps and prompt passes run at the idle scheduling priority
    /// (Linux SCHED_IDLE), so the threads that stream tokens to clients and read new requests
    /// take a core from them at once: earlier tokens under load. Other busy processes in the
    /// same cgroup then come first too. Needs CAP_SYS_NICE or RLIMIT_NICE >= 20 (a thread
    /// must come back from it).
    #[arg(long, env, value_name = "BOOL",
          default_value_t = Config::default().admission.idle_priority, action = clap::ArgAction::Set)]
    idle_priority: bool,
    /// Generation: how long an idle model's first request waits for the requests the server
    /// has begun to read and tokenize meanwhile, so that a burst shares one prompt pass. It
    /// waits only while such requests are on their way (a lone request does not wait); 0
    /// never waits.
    #[arg(long, env, value_name = "MS",
          default_value_t = Config::default().admission.arrival_wait.as_secs_f64() * 1e3,
          value_parser = arrival_wait_ms, allow_negative_numbers = true)]
    arrival_wait_ms: f64,
    /// Generation: the most prompt tokens (padded) one prompt pass runs; a longer prompt runs
    /// in chunks of this many, one per decoding step, so running streams keep going and a
    /// client that leaves stops it within a chunk (TGI's flag; TGI's default is 4096).
    #[arg(long, env, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..),
          default_value_t = Config::default().admission.max_prefill_tokens as u64, allow_negative_numbers = true)]
    max_batch_prefill_tokens: u64,
    /// Generation: the most tokens the kept prefixes hold together (finished sequences' keys
    /// and values, so a prompt that starts the same way, as the next turn of a chat or a shared
    /// system prompt, runs only its rest; also at most 256 MB); 0 keeps none (llama.cpp's
    /// server bounds its prompt cache with `--cache-ram`).
    #[arg(long, env, value_name = "TOKENS",
          default_value_t = Config::default().admission.prefix_cache_tokens, allow_negative_numbers = true)]
    prefix_cache_tokens: usize,
    /// Requests running or queued at once; more are answered 429 before any work.
    #[arg(long, env, value_name = "N", default_value_t = Config::default().max_concurrent_requests, allow_negative_numbers = true)]
    max_concurrent_requests: usize,
    /// TGI's `best_of`: the most candidates one generation request may ask for (TGI's
    /// --max-best-of).
    #[arg(long, env, value_name = "N", default_value_t = Config::default().max_best_of, allow_negative_numbers = true)]
    max_best_of: usize,
    /// Requests waiting in the models' batch queues at once; more are answered 429.
    #[arg(long, env, value_name = "N", default_value_t = Config::default().max_queue_size, allow_negative_numbers = true)]
    max_queue_size: usize,
    /// A request that has not started answering after this long gets 504 (its work stops).
    #[arg(long, env, value_name = "SECONDS", value_parser = seconds, allow_negative_numbers = true)]
    request_timeout: Option<f64>,
    /// After SIGTERM or Ctrl-C, how long requests in flight may take to finish; past it,
    /// generations stop (streams end with an error event) and the server exits.
    #[arg(long, env, value_name = "SECONDS", value_parser = seconds_or_zero,
          default_value_t = Config::default().graceful_shutdown_timeout.as_secs_f64(), allow_negative_numbers = true)]
    graceful_shutdown_timeout: f64,
    /// Seconds without requests after which the server hands back the memory it keeps for
    /// reuse (spare key/value buffers, the allocator's freed pages); 0: never. The first
    /// requests after a release are a few milliseconds slower.
    #[arg(long, env, value_name = "SECONDS", value_parser = seconds_or_zero,
          default_value_t = Config::default().idle_release_after.map_or(0.0, |d| d.as_secs_f64()),
          allow_negative_numbers = true)]
    release_memory_after: f64,
    /// Origins (or `*`) whose browser pages may call the server (comma-separated in the
    /// environment).
    #[arg(long, env, value_name = "ORIGIN", value_delimiter = ',')]
    cors_allow_origin: Vec<String>,
    /// Log lines as JSON.
    #[arg(long, env)]
    json_output: bool,
    /// No per-request log lines.
    #[arg(long)]
    quiet: bool,
    /// Threads for the models' arithmetic (1 to 1024).
    #[arg(long, value_name = "N", value_parser = crate::threads, allow_negative_numbers = true)]
    threads: Option<u64>,
    /// Where the models run: cpu, cuda or cuda:N (cuda needs a build with the `cuda` feature,
    /// scripts/build-cuda.sh).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// The models' dtype: f32, f16 or bf16 (float32, float16, bfloat16: TEI's and TGI's
    /// --dtype). Default: f32 on CPU; on a GPU each checkpoint's own (bf16 for a bf16
    /// checkpoint, f16 for GGUF), as transformers' torch_dtype="auto".
    #[arg(long, env, value_name = "DTYPE",
          value_parser = crate::names(crate::DTYPES, crate::parse_dtype))]
    dtype: Option<ferroformers::DType>,
    /// GGUF models on CPU: round activations to 8 bits per block with integer products as
    /// llama.cpp does (int8, the default), or keep them f32 for transformers' exact numbers
    /// (exact: log-likelihoods as transformers gives them for the dequantized model, slower).
    #[arg(long, env = "FERROFORMERS_GGUF_MATH", value_name = "MODE",
          value_parser = crate::names(ferroformers::QuantMath::NAMES, ferroformers::QuantMath::parse))]
    gguf_math: Option<ferroformers::QuantMath>,
    /// Generation: batch-invariant arithmetic, so that a request's tokens are the ones it gets
    /// alone, bit for bit, whatever else runs beside it (other requests' rows, its prompt's
    /// chunks, a kept prefix). GGUF models of the Llama family in the int8 mode on CPUs with
    /// AVX-512 VNNI have it. true: a model without it fails to load, saying why; auto (the
    /// default): on where it costs no speed, off where it would. On AMD's cores: on for every
    /// matrix Q8_0, or Q4_0, Q4_1 or Q4_K of at most 2 MiB (SmolLM2-135M's Q4_1 file), off
    /// for 5- and 6-bit matrices (Qwen2.5's Q4_K_M) and larger 4-bit ones. On Intel's: on for
    /// every type but Q2_K and Q3_K.
    #[arg(long, env, value_name = "auto|true|false", default_value = "auto",
          value_parser = crate::auto_bool)]
    batch_invariant: crate::AutoBool,
}

/// `--waiting-served-ratio`: a finite number >= 0.
fn ratio(v: &str) -> Result<f32, String> {
    v.parse::<f32>()
        .ok()
        .filter(|r| *r >= 0.0 && r.is_finite())
        .ok_or_else(|| format!("takes a number >= 0, not `{v}`"))
}

/// `--arrival-wait-ms`: milliseconds from 0 to 1000 (a wait that long would be a stall).
fn arrival_wait_ms(v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|ms| (0.0..=1000.0).contains(ms))
        .ok_or_else(|| format!("takes milliseconds from 0 to 1000, not `{v}`"))
}

/// `--request-timeout`: seconds > 0.
fn seconds(v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s < 1e9)
        .ok_or_else(|| format!("takes seconds > 0 (below 1e9), not `{v}`"))
}

/// `--graceful-shutdown-timeout`: seconds >= 0.
fn seconds_or_zero(v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| *s >= 0.0 && *s < 1e9)
        .ok_or_else(|| format!("takes seconds >= 0 (below 1e9), not `{v}`"))
}

pub fn serve(a: ServeArgs) -> Result<(), String> {
    crate::purge_freed_memory_late();
    if let Some(n) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let device = match &a.device {
        Some(d) => ferroformers::device(d).map_err(|e| format!("--device: {e}"))?,
        None => ferroformers::Device::Cpu,
    };
    let mut cfg = Config {
        models: a.model.iter().map(|m| ModelSpec::parse(m)).collect(),
        served_model_name: a.served_model_name,
        hostname: a.hostname,
        port: a.port,
        api_key: a.api_key,
        payload_limit: a.payload_limit,
        max_client_batch_size: a.max_client_batch_size,
        max_batch_inputs: a.max_batch_inputs,
        max_batch_tokens: a.max_batch_tokens,
        auto_truncate: a.auto_truncate,
        max_batch_wait: std::time::Duration::from_millis(a.max_batch_wait_ms),
        max_batch_total_tokens: a.max_batch_total_tokens,
        max_concurrent_requests: a.max_concurrent_requests,
        max_best_of: a.max_best_of,
        cors_allow_origin: a.cors_allow_origin,
        max_queue_size: a.max_queue_size,
        request_timeout: a.request_timeout.map(std::time::Duration::from_secs_f64),
        graceful_shutdown_timeout: std::time::Duration::from_secs_f64(a.graceful_shutdown_timeout),
        json_output: a.json_output,
        quiet: a.quiet,
        device,
        dtype: a.dtype,
        gguf_math: a.gguf_math,
        batch_invariant: a.batch_invariant.0,
        idle_release_after: (a.release_memory_after > 0.0)
            .then(|| std::time::Duration::from_secs_f64(a.release_memory_after)),
        on_idle: Some(crate::give_back_freed_memory),
        ..Config::default()
    };
    cfg.admission.max_waiting_tokens = a.max_waiting_tokens;
    cfg.admission.waiting_served_ratio = a.waiting_served_ratio;
    cfg.admission.prefill_priority = a.prefill_priority;
    cfg.admission.idle_priority = a.idle_priority;
    cfg.admission.arrival_wait = std::time::Duration::from_secs_f64(a.arrival_wait_ms / 1e3);
    cfg.admission.prefix_cache_tokens = a.prefix_cache_tokens;
    cfg.admission.max_prefill_tokens =
        usize::try_from(a.max_batch_prefill_tokens).unwrap_or(usize::MAX);
    ferroformers_server::serve_blocking(cfg)
}
