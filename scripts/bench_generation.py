#!/usr/bin/env python3
"""Text-generation benchmark: ferroformers vs Python transformers (torch) vs llama.cpp
(llama-cpp-python), SmolLM2-135M-Instruct, all three reading the same GGUF file (Q4_1).

  scripts/fetch-models.sh smollm2
  pip install -r scripts/requirements-fixtures.txt -r scripts/requirements-bench.txt \
      llama-cpp-python
  cargo build --release -p ferroformers-cli
  python3 scripts/bench_generation.py [--reps 3] [--threads 2] \
      [--engines ours,ours-f32,torch,llama.cpp]

Engines (each run is its own child process, so peak RSS is per engine and per run):
  ours       the CLI on the GGUF as it loads by default (weights kept in their Q4_1/Q8_0 blocks,
             f32 activations)
  ours-f32   the CLI with FERROFORMERS_GGUF_DEQUANTIZE=1 (every matrix dequantized to f32 at load)
  torch      transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (dequantizes to
             f32), greedy model.generate, torch.set_num_threads(T)
  llama.cpp  llama_cpp.Llama(n_threads=T, n_threads_batch=T, n_ctx=512), temperature 0 (greedy);
             its high-level API has no batched generation, so "batch" runs the 8 prompts one after
             another in one process ("8 sequential" in the table)

Work: 64 new tokens (--new-tokens) per prompt, greedy. ours and torch suppress eos until then
(min_new_tokens = max_new_tokens = 64); llama-cpp-python has no min_tokens, so its actual
completion_tokens are counted (with these prompts greedy decoding runs to 64 without eos anyway)
and a warning is printed when any engine's count is short. The prompt tokens are the same for all
engines: the GGUF says tokenizer.ggml.add_bos_token = false, which ours and llama.cpp follow;
transformers' GGUF tokenizer would prepend <|im_start|> anyway, so torch tokenizes with
add_special_tokens=False.
Prompts are plain text (no chat template).

Three runs per engine and repetition, engines alternating order between repetitions:
  stream  "The capital of France is", streamed: time to first token (TTFT)
  single  the same prompt, not streamed: tokens/s for one stream
  batch   8 different short prompts in one batch (left padded): tokens/s
Reported (medians over repetitions):
  tokens/s              new tokens (all rows) / generation seconds; generation seconds run from
                        "model and tokenizer loaded" to "all texts decoded" (ours: `run_s` of
                        --timing, which also includes tokenization and printing)
  load (s)              process start -> model and tokenizer ready (imports included)
  start -> 1st token    process start -> first generated text on the child's stdout, measured by
                        this script on the pipe (ours: `--stream`; Python children print a marker
                        at the first new token)
  load -> 1st token     model ready -> first new token (prompt tokenization + prefill + first
                        step), timed in-process. Python children time it in the stream run; ours
                        prints no timing with --stream, so its stream step also runs the CLI once
                        with max_new_tokens=1 --timing and takes that run's `run_s`.
  peak RSS (MB)         the child's maximum resident set size (/usr/bin/time %M)
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchlib import timed, timing_line

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
BATCH_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was",
    "The best way to learn programming is",
    "In the year 2050, cities will",
    "My favourite recipe starts with",
    "The theory of relativity says that",
    "A good night's sleep helps",
    "The ocean is home to",
]
ENGINES = {
    "ours": "ferroformers (Q4_1 blocks)",
    "ours-f32": "ferroformers (f32)",
    "torch": "transformers (torch, f32)",
    "llama.cpp": "llama.cpp (Q4_1)",
}
MARKER = "__FIRST_TOKEN__"


def find_gguf():
    """Same discovery as scripts/fetch-models.sh: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub; then refs/main -> snapshots/<commit>/<file>."""
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"]).expanduser()
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]).expanduser() / "hub"
    else:
        root = Path.home() / ".cache" / "huggingface" / "hub"
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    ref = repo / "refs" / "main"
    path = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else "?") / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} not found; run scripts/fetch-models.sh smollm2")
    return path


# ---------------------------------------------------------------------------------------------
# Child processes (Python engines). They print MARKER at the first new token when streaming and
# one JSON line last on stdout.

def child_torch(a, prompts, stream):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(a.threads)
    d, name = os.path.split(a.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()
    tok.padding_side = "left"
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if tok.pad_token_id is None:
        tok.pad_token_id = pad
    loaded = time.time()

    class FirstToken(BaseStreamer):
        """generate() puts the prompt first, then each new token."""
        def __init__(self):
            self.puts, self.t = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.t = time.time()
                sys.stdout.write(MARKER + "\n")
                sys.stdout.flush()

        def end(self):
            pass

    streamer = FirstToken() if stream else None
    t1 = time.perf_counter()
    with torch.inference_mode():
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                             do_sample=False, pad_token_id=pad, streamer=streamer)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    gen_s = time.perf_counter() - t1
    return {"load_s": loaded - a.t0, "gen_s": gen_s, "new_tokens": int(new.numel()),
            "prompt_tokens": [int(m.sum()) for m in enc["attention_mask"]],
            "first_after_load_s": streamer.t - loaded if stream else None, "texts": texts}


def child_llama(a, prompts, stream):
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=512,
                verbose=False, seed=0)
    # No eos suppression (no min_tokens here; a Python logits processor would add a callback per
    # token): the actual number of new tokens is counted, and the parent warns when it is short.
    kw = dict(max_tokens=a.new_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
              repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    loaded = time.time()
    first, texts, new_tokens, prompt_tokens = None, [], 0, []
    t1 = time.perf_counter()
    for p in prompts:
        llm.reset()
        if stream:
            parts = []
            for chunk in llm.create_completion(p, stream=True, **kw):
                if first is None:
                    first = time.time()
                    sys.stdout.write(MARKER + "\n")
                    sys.stdout.flush()
                parts.append(chunk["choices"][0]["text"])
            texts.append("".join(parts))
            # No usage in streamed chunks: the context holds prompt + new tokens (the last new
            # token is sampled but not evaluated).
            n_prompt = len(llm.tokenize(p.encode()))
            new_tokens += llm.n_tokens - n_prompt + 1
            prompt_tokens.append(n_prompt)
        else:
            r = llm.create_completion(p, **kw)
            texts.append(r["choices"][0]["text"])
            new_tokens += r["usage"]["completion_tokens"]
            prompt_tokens.append(r["usage"]["prompt_tokens"])
    gen_s = time.perf_counter() - t1
    return {"load_s": loaded - a.t0, "gen_s": gen_s, "new_tokens": new_tokens,
            "prompt_tokens": prompt_tokens,
            "first_after_load_s": first - loaded if stream else None, "texts": texts}


def child_main(a):
    prompts = [PROMPT] if a.mode in ("stream", "single") else BATCH_PROMPTS
    fn = child_torch if a.child == "torch" else child_llama
    r = fn(a, prompts, a.mode == "stream")
    sys.stdout.write("\n" + json.dumps(r) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Parent side.

def timed_stream(cmd, env):
    """Like benchlib.timed, but also the seconds from spawn to the child's first stdout bytes.
    Returns (stdout text, stderr text, peak RSS MB, first-output seconds)."""
    full = ["/usr/bin/time", "-f", "__RSS_KB__=%M"] + [str(c) for c in cmd]
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=err, env=env)
        first_chunk = os.read(p.stdout.fileno(), 65536)
        t_first = time.perf_counter() - t0
        rest = p.stdout.read()
        rc = p.wait()
        err.seek(0)
        stderr = err.read()
    if rc != 0 or not first_chunk:
        sys.exit(f"failed: {' '.join(str(c) for c in cmd)}\n{stderr[-3000:]}")
    rss = next(int(ln.split("=")[1]) for ln in stderr.splitlines() if ln.startswith("__RSS_KB__="))
    return (first_chunk + rest).decode("utf-8", "replace"), stderr, rss / 1024, t_first


def run_ours(a, engine, mode, files, env):
    env = dict(env)
    if engine == "ours-f32":
        env["FERROFORMERS_GGUF_DEQUANTIZE"] = "1"
    n = a.new_tokens
    cmd = [a.binary, "run", "text-generation", "--model", a.gguf, "--threads", a.threads,
           "--param", f"max_new_tokens={n}", "--param", f"min_new_tokens={n}",
           "--param", "do_sample=false", "--param", "return_full_text=false",
           "--input", files["batch" if mode == "batch" else "single"]]
    if mode == "stream":
        out, _, rss, t_first = timed_stream(cmd + ["--stream"], env)
        # --stream prints no timing, so "load -> 1st token" comes from a second process that
        # generates one token: its `run_s` is tokenization + prefill + first step (+ printing).
        one = [c if c != f"max_new_tokens={n}" else "max_new_tokens=1" for c in cmd]
        one = [c if c != f"min_new_tokens={n}" else "min_new_tokens=1" for c in one]
        p, rss1 = timed(one + ["--timing"], env)
        return {"start_first_s": t_first, "first_after_load_s": timing_line(p.stderr)["run_s"],
                "rss_mb": max(rss, rss1), "texts": [out.rstrip("\n")]}
    cmd += ["--batch-size", "8" if mode == "batch" else "1", "--timing"]
    p, rss = timed(cmd, env)
    t = timing_line(p.stderr)
    texts = [json.loads(ln)[0]["generated_text"] for ln in p.stdout.splitlines() if ln.strip()]
    # The CLI prints text only: with min_new_tokens = max_new_tokens every row has n new tokens.
    return {"load_s": t["load_s"], "gen_s": t["run_s"], "new_tokens": n * len(texts),
            "rss_mb": rss, "texts": texts}


def run_python(a, engine, mode, env):
    t0 = time.time()
    cmd = [sys.executable, __file__, "--child", engine, "--mode", mode, "--gguf", a.gguf,
           "--threads", a.threads, "--new-tokens", a.new_tokens, "--t0", repr(t0)]
    if mode == "stream":
        out, _, rss, t_first = timed_stream(cmd, env)
    else:
        p, rss = timed(cmd, env)
        out, t_first = p.stdout, None
    r = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    r["rss_mb"] = rss
    if t_first is not None:
        r["start_first_s"] = t_first
    return r


def versions():
    out = []
    for pkg in ("torch", "transformers", "llama-cpp-python"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} missing")
    return ", ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--engines", default="ours,ours-f32,torch,llama.cpp")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "ferroformers"))
    ap.add_argument("--gguf",
                    help="default: the hub-cache file that scripts/fetch-models.sh smollm2 puts")
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    # child mode (internal)
    ap.add_argument("--child", choices=["torch", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["stream", "single", "batch"], help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a)

    engines = a.engines.split(",")
    for e in engines:
        if e not in ENGINES:
            sys.exit(f"unknown engine {e!r} (expected some of {','.join(ENGINES)})")
    a.gguf = str(Path(a.gguf) if a.gguf else find_gguf())
    tmp = Path(tempfile.mkdtemp())
    files = {"single": tmp / "single.jsonl", "batch": tmp / "batch.jsonl"}
    files["single"].write_text(json.dumps(PROMPT) + "\n")
    files["batch"].write_text("".join(json.dumps(p) + "\n" for p in BATCH_PROMPTS))
    t = str(a.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=t,
               MKL_NUM_THREADS=t, RAYON_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false")
    modes = ["stream", "single", "batch"]
    res = {}  # (engine, mode) -> list of per-rep dicts
    problems = []
    load0 = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    for rep in range(a.reps):
        order = engines if rep % 2 == 0 else list(reversed(engines))
        for mode in modes:
            for e in order:
                r = (run_ours(a, e, mode, {k: str(v) for k, v in files.items()}, env)
                     if e.startswith("ours") else run_python(a, e, mode, env))
                res.setdefault((e, mode), []).append(r)
                msg = f"rep {rep} {e:9} {mode:6}:"
                if "gen_s" in r and mode != "stream":
                    msg += f" {r['new_tokens'] / r['gen_s']:6.1f} tok/s, load {r['load_s']:.2f} s,"
                if "start_first_s" in r:
                    msg += f" start->1st token {r['start_first_s']:.2f} s,"
                print(f"{msg} RSS {r['rss_mb']:.0f} MB", file=sys.stderr)
    load1 = os.getloadavg()

    # sanity: token counts and the single-stream texts
    for (e, mode), rs in res.items():
        want = a.new_tokens * (len(BATCH_PROMPTS) if mode == "batch" else 1)
        for r in rs:
            if mode != "stream" and r["new_tokens"] != want:
                problems.append(f"{e} {mode}: {r['new_tokens']} new tokens, expected {want}")
    print("\nsingle-stream texts (first repetition):", file=sys.stderr)
    for e in engines:
        print(f"  {e:9} {res[(e, 'single')][0]['texts'][0][:100]!r}", file=sys.stderr)
    for p in sorted(set(problems)):
        print(f"WARNING: {p}", file=sys.stderr)

    def med(e, mode, key):
        vals = [r[key] for r in res[(e, mode)] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def tps(e, mode):
        return statistics.median(r["new_tokens"] / r["gen_s"] for r in res[(e, mode)])

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\ntext-generation, SmolLM2-135M-Instruct {GGUF_NAME}, {a.new_tokens} new tokens per "
          f"prompt (greedy), {a.threads} threads, median of {a.reps}; "
          f"{started:%Y-%m-%d %H:%M} UTC; load average before {load0[0]:.2f}, "
          f"after {load1[0]:.2f}; "
          f"{versions()}")
    print("| engine | run | new tokens | tokens/s | vs torch | vs llama.cpp | load (s) "
          "| load -> 1st token (s) | start -> 1st token (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ["single", "batch"]:
        base_t = tps("torch", mode) if "torch" in engines else None
        base_l = tps("llama.cpp", mode) if "llama.cpp" in engines else None
        for e in engines:
            v = tps(e, mode)
            run = ("1 stream" if mode == "single"
                   else "8 sequential" if e == "llama.cpp" else "batch 8")
            stream = mode == "single"
            print(f"| {ENGINES[e]} | {run} | {round(med(e, mode, 'new_tokens'))} | {v:.1f} "
                  f"| {fmt(base_t and v / base_t, '.2f')}{'x' if base_t else ''} "
                  f"| {fmt(base_l and v / base_l, '.2f')}{'x' if base_l else ''} "
                  f"| {med(e, mode, 'load_s'):.2f} "
                  f"| {fmt(med(e, 'stream', 'first_after_load_s') if stream else None, '.3f')} "
                  f"| {fmt(med(e, 'stream', 'start_first_s') if stream else None, '.2f')} "
                  f"| {med(e, mode, 'rss_mb'):.0f} |")
    if a.json:
        a.json.write_text(json.dumps({f"{e}/{m}": v for (e, m), v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
