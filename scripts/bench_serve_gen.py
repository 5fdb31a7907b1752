#!/usr/bin/env python3
"""Generation serving under load: `ferroformers serve` against llama-cpp-python's OpenAI server
on the same GGUF file, streaming `POST /v1/chat/completions`, side by side.

  scripts/fetch-models.sh smollm2 && cargo build --release -p ferroformers-cli
  cargo build --release -p ferroformers-server --example sse_load   # the load generator
  pip install llama-cpp-python==0.3.36 uvicorn fastapi sse-starlette starlette-context \\
      pydantic-settings httpx
  python3 scripts/bench_serve_gen.py [--concurrency 1,4,16] [--requests 32] [--tokens 64] [--reps 3]
      [--distinct]   (every request a different chat: prompts share only their start)
      [--spread 32-96]   (each request's max_tokens from the range: requests end and arrive one
                     by one, not in waves of equal requests)
      [--before BINARY [--before-env KEY=VALUE]...]   (another build, or the same one with a
                     switch, served beside ours and alternating with it in every round)

The load comes from `examples/sse_load.rs` (`--client python`: httpx in asyncio, which on 2
cores delays its own request starts by ~3 ms each). Each client sends the same chat (one user
message) with `max_tokens` TOKENS, `temperature` 0 and `stream: true`, reads the events to
`[DONE]`, and records the time to the first content event and the number of content events. Aggregate tokens/s = completion tokens of all requests
/ wall time of the run (completion tokens from the usage chunk, `stream_options.include_usage`;
events when a server sends none). Engines alternate within each repetition; medians of the
repetitions. Then each server's resident memory: when ready, its peak, and IDLE_S seconds
after the last run.

Both servers get 2 threads: ours `--threads 2`; llama-cpp-python `--n_threads 2
--n_threads_batch 2` (`--peer-threads N`: N instead; on a 2-core Ice Lake its server streamed
39.5 tokens/s with 1 thread against 29.7 with 2, its compute threads sharing the cores with its
event loop), context 2048, `--interrupt_requests False` (by default a new request cuts
the stream in progress short), one model instance (its server answers one request at a time;
concurrent clients queue). Ours batches concurrent requests continuously (`ours-solo`: the
same binary with `--max-batch-total-tokens 0`, each request decoding alone).
"""
import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchlib import cpu_model, sse_load, wait_ready

ROOT = Path(__file__).resolve().parent.parent
# --model: the hub repository, its GGUF file and a name for the tables
# (scripts/fetch-models.sh smollm2 / qwen25coder).
MODELS = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct"),
    "qwen25coder": ("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                   "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Qwen2.5-Coder-0.5B-Instruct"),
}
REPO, FILE, NAME = MODELS["smollm2"]
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
# --distinct: every request its own chat (the Rust client puts the request's number for {i};
# {run} names the run, so no run repeats an earlier run's chats, which a server's prefix cache
# would then answer from its kept keys and values), so prompts share only their start and each
# runs its own rest; with `min_tokens` every answer is --tokens long (llama-cpp-python ignores
# it and may stop earlier).
DISTINCT = [{"role": "user", "content": "Write a short story about a lighthouse keeper called Keeper {run}-{i}."}]


def gguf_path():
    hub = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache/huggingface/hub"))
    repo = hub / ("models--" + REPO.replace("/", "--"))
    ref = (repo / "refs" / "main").read_text().strip()
    return repo / "snapshots" / ref / FILE


async def one(client, url, model, tokens):
    body = {"model": model, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, events, usage = None, 0, None
    async with client.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    events += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    done = usage["completion_tokens"] if usage else events
    return ttft if ttft is not None else float("nan"), done


async def run_load(url, model, conc, n, tokens):
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits) as client:
        sem = asyncio.Semaphore(conc)

        async def task():
            async with sem:
                return await one(client, url, model, tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*[task() for _ in range(n)])
        wall = time.perf_counter() - t0
    return summary([r[0] for r in res], sum(r[1] for r in res), wall)


def summary(ttfts, toks, wall):
    """Aggregate tokens/s and the first-token p50/p99 of one run."""
    ttfts = sorted(ttfts)
    return {"tok_s": toks / wall, "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
            "tokens": toks, "ttfts": ttfts}


def pooled_p99_ms(rs):
    """The nearest-rank p99 of every first token of runs `rs` together: with 64 requests a
    run, a run's p99 is its slowest request, which one stall decides."""
    t = sorted(x for r in rs for x in r["ttfts"])
    return 1000 * t[max(0, math.ceil(0.99 * len(t)) - 1)]


def run_load_rust(client, url, model, conc, n, tokens, distinct=False, run="0", spread=None):
    """The same load from `examples/sse_load.rs` (blocking client threads, asleep on their sockets
    between events): the Python client needed ~3 ms of CPU per request start on these 2 cores,
    so a wave of 16 reached a server spread over ~40 ms, which its time to first token counted."""
    messages = [dict(m, content=m["content"].replace("{run}", run)) for m in DISTINCT]
    body = {"model": model, "messages": messages if distinct else MESSAGES, "max_tokens": tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    if distinct:
        body["min_tokens"] = tokens
    text = json.dumps(body)
    if spread:
        # Each request's own max_tokens from the range (sse_load's `{r:A-B}`, fixed per request
        # number, so every server gets the same requests).
        text = text.replace(f'"max_tokens": {tokens}', f'"max_tokens": {{r:{spread}}}')
    d = sse_load(client, url, text, conc, n)
    return summary(d["ttft_s"], d["tokens"], d["wall_s"])


def memory_mb(pid):
    """The process's resident memory and its peak (VmRSS, VmHWM), MB."""
    f = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            f[k] = int(v.split()[0]) / 1024
    return f.get("VmRSS", float("nan")), f.get("VmHWM", float("nan"))


# Seconds after the last run at which each server's resident memory is read.
IDLE_S = 35


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--distinct", action="store_true",
                    help="every request a different chat (Rust client only): prompts share only "
                         "their start, and each answer is --tokens long (min_tokens)")
    ap.add_argument("--spread", metavar="A-B",
                    help="each request's max_tokens from A to B instead of --tokens (Rust client "
                         "only): answers of mixed lengths end at different steps, so requests "
                         "arrive one by one instead of in waves of equal requests")
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS),
                    help="the GGUF model every server runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-threads", type=int,
                    help="llama-cpp-python's threads (default: --threads). Its server ran 1.33x "
                         "faster with 1 thread than with 2 on a 2-core Ice Lake (its compute "
                         "threads and its Python event loop share the cores): give it its best")
    ap.add_argument("--engines", default="ours,ours-solo,llama.cpp",
                    help="ours (continuous batching), ours-solo (--max-batch-total-tokens 0), llama.cpp")
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--client", default="rust", choices=["rust", "python"],
                    help="rust: examples/sse_load.rs (cargo build --release -p ferroformers-server "
                         "--example sse_load), the same for every server; python: httpx in asyncio")
    ap.add_argument("--before", help="another ferroformers binary (e.g. an earlier commit's), "
                                     "served beside --binary and measured in the same rounds")
    ap.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the --before server only (repeatable), e.g. "
                         "--before target/release/ferroformers --before-env FERROFORMERS_NO_STEER=1 "
                         "to measure a switch on one binary")
    a = ap.parse_args()
    global REPO, FILE, NAME
    REPO, FILE, NAME = MODELS[a.model]
    client = ROOT / "target/release/examples/sse_load"
    if (a.distinct or a.spread) and a.client != "rust":
        sys.exit("--distinct and --spread need the Rust client")
    if a.client == "rust" and not client.exists():
        sys.exit(f"{client} is missing: cargo build --release -p ferroformers-server --example "
                 "sse_load (or --client python)")

    def load(url, model, c, n, tokens, run="warmup"):
        if a.client == "rust":
            return run_load_rust(str(client), url, model, c, n, tokens, a.distinct, run,
                                 a.spread if run != "warmup" else None)
        return asyncio.run(run_load(url, model, c, n, tokens))
    gguf = gguf_path()
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYON_NUM_THREADS=str(a.threads),
               OMP_NUM_THREADS=str(a.threads))
    ap_engines = [e for e in a.engines.split(",") if e]
    servers = {}
    ours_cmd = [a.binary, "serve", "--model", f"{REPO}=text-generation", "--threads", str(a.threads),
                "--quiet"]
    if "ours" in ap_engines:
        p = subprocess.Popen(ours_cmd + ["--port", "3941"], env=env, stderr=subprocess.DEVNULL)
        servers["ours"] = ("http://127.0.0.1:3941", p, REPO, "/health")
    if a.before:
        # Another build of ours (an earlier commit), alternating with this one in the same run.
        before_env = dict(env)
        for kv in a.before_env:
            k, sep, v = kv.partition("=")
            if not sep or not k:
                sys.exit(f"--before-env wants KEY=VALUE, got {kv!r}")
            before_env[k] = v
        p = subprocess.Popen([a.before] + ours_cmd[1:] + ["--port", "3944"], env=before_env,
                             stderr=subprocess.DEVNULL)
        servers["before"] = ("http://127.0.0.1:3944", p, REPO, "/health")
    if "ours-solo" in ap_engines:
        # The same binary with continuous batching off: each request decodes on its own.
        p = subprocess.Popen(ours_cmd + ["--port", "3943", "--max-batch-total-tokens", "0"], env=env,
                             stderr=subprocess.DEVNULL)
        servers["ours-solo"] = ("http://127.0.0.1:3943", p, REPO, "/health")
    if "llama.cpp" in ap_engines:
        peer = str(a.peer_threads or a.threads)
        p = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", "3942",
                              "--n_threads", peer, "--n_threads_batch", peer,
                              "--n_ctx", "2048", "--verbose", "False", "--interrupt_requests", "False"],
                             env=dict(env, OMP_NUM_THREADS=peer), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        servers["llama.cpp"] = ("http://127.0.0.1:3942", p, str(gguf), "/v1/models")
    res = {}
    load0 = os.getloadavg()
    try:
        for base, proc, _, probe in servers.values():
            wait_ready(base + probe, proc)
        mem = {name: {"ready": memory_mb(s[1].pid)[0]} for name, s in servers.items()}
        conc = [int(c) for c in a.concurrency.split(",")]
        # Warm-up, every server alike: one request per client at each concurrency measured,
        # as long as the longest measured one. A server's first burst at a new concurrency
        # and length pays one-time costs (ours: the pages of 16 rows' keys and values, a
        # 16-row prompt pass of ~23 ms instead of ~11), which otherwise land in the first
        # repetition's p99.
        longest = int(a.spread.split("-")[1]) if a.spread else a.tokens
        for name, (base, _, model, _) in servers.items():
            for c in [2] + conc:
                load(base + "/v1/chat/completions", model, c, c, longest)
        for rep in range(a.reps):
            order = list(servers) if rep % 2 == 0 else list(reversed(servers))
            for c in conc:
                for name in order:
                    base, _, model, _ = servers[name]
                    r = load(base + "/v1/chat/completions", model, c, a.requests, a.tokens,
                             f"{rep}.{c}")
                    res.setdefault((name, c), []).append(r)
                    print(f"rep {rep} c={c} {name}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms "
                          f"p99 {r['ttft_p99_ms']:.0f} ms, {r['tokens']} tokens", file=sys.stderr)
        for name, (_, proc, _, _) in servers.items():
            mem[name]["peak"] = memory_mb(proc.pid)[1]
        # Memory once the load has gone: ours gives back what it keeps after 30 s idle.
        time.sleep(IDLE_S)
        for name, (_, proc, _, _) in servers.items():
            mem[name]["idle"] = memory_mb(proc.pid)[0]
    finally:
        for _, proc, _, _ in servers.values():
            proc.terminate()
    load1 = os.getloadavg()
    print(f"\nstreamed chat completions{' (a different chat each, min_tokens)' if a.distinct else ''}, "
          f"{NAME} {FILE}, {a.requests} requests x "
          f"{a.spread + ' (max_tokens per request)' if a.spread else a.tokens} tokens per run, {a.threads} threads{f' (llama-cpp-python: {a.peer_threads})' if a.peer_threads else ''}, median of {a.reps}, {a.client} client; "
          f"CPU {cpu_model()}; "
          f"load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    labels = {"ours": "ferroformers serve (continuous batching)",
              "ours-solo": "ferroformers serve, `--max-batch-total-tokens 0`",
              "before": "ferroformers serve, `--before` binary",
              "llama.cpp": "llama-cpp-python server"}
    ref = "llama.cpp" if "llama.cpp" in servers else next(iter(servers))
    print(f"| server | concurrency | aggregate tokens/s | vs {labels[ref]} | TTFT p50 (ms) | TTFT p99 (ms) "
          f"| TTFT p99 of all runs' requests (ms) |")
    print("|---|---|---|---|---|---|---|")
    for c in conc:
        base = statistics.median(r["tok_s"] for r in res[(ref, c)])
        for name in servers:
            rs = res[(name, c)]
            t = statistics.median(r["tok_s"] for r in rs)
            print(f"| {labels[name]} | {c} | {t:.1f} | {t / base:.2f}x | "
                  f"{statistics.median(r['ttft_p50_ms'] for r in rs):.0f} | "
                  f"{statistics.median(r['ttft_p99_ms'] for r in rs):.0f} | "
                  f"{pooled_p99_ms(rs):.1f} |")
    # Issue 12's goal: p99 time to first token under load at most 2x that at concurrency 1.
    if 1 in conc and len(conc) > 1:
        for name in servers:
            one = pooled_p99_ms(res[(name, 1)])
            ratios = ", ".join(f"{c}: {pooled_p99_ms(res[(name, c)]) / one:.2f}x" for c in conc if c != 1)
            print(f"\n{labels[name]}: pooled TTFT p99 against concurrency 1's ({one:.1f} ms): {ratios}")
    print(f"\n| server | RSS ready (MB) | peak RSS (MB) | RSS {IDLE_S} s after the last run (MB) |")
    print("|---|---|---|---|")
    for name in servers:
        m = mem[name]
        print(f"| {labels[name]} | {m['ready']:.0f} | {m['peak']:.0f} | {m['idle']:.0f} |")


if __name__ == "__main__":
    main()
