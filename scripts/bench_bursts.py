#!/usr/bin/env python3
"""Bursts at an idle batch: how long the slowest request of a wave waits for its first token,
for two builds of `ferroformers serve` side by side (or one build alone).

  scripts/fetch-models.sh smollm2 && cargo build --release -p ferroformers-cli
  cargo build --release -p ferroformers-server --example sse_load
  python3 scripts/bench_bursts.py --binary target/release/ferroformers [--before OTHER_BINARY]
      [--rounds 10] [--concurrency 16] [--requests 64] [--tokens 64]

Each run is one `examples/sse_load` process: CONCURRENCY clients send the same streamed chat
(`max_tokens` TOKENS, temperature 0) until REQUESTS are done. Equal chats end at the same step,
so the clients come back together: every wave of CONCURRENCY requests reaches an idle batch,
and its first tokens come from one prompt pass. A run's first wave also opens the clients'
connections. The servers alternate run by run; for each the script prints the median and the
90th percentile over waves of the wave's slowest time to first token, the first waves of the
runs apart from the later ones. `scripts/bench_serve_gen.py` measures throughput and pooled
percentiles; this isolates the bursts, a few dozen of them per build.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchlib import cpu_model, sse_load, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def quantile(v, q):
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--before", help="another ferroformers binary, alternating with --binary")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.rounds < 1 or a.concurrency < 1 or a.threads < 1:
        sys.exit("--rounds, --concurrency and --threads must be at least 1")
    if a.requests < 2 * a.concurrency or a.requests % a.concurrency:
        sys.exit("--requests must be a multiple of --concurrency, at least two waves (the "
                 "first waves are reported apart)")
    client = ROOT / "target/release/examples/sse_load"
    if not client.exists():
        sys.exit(f"{client} is missing: cargo build --release -p ferroformers-server --example sse_load")
    builds = {"this": a.binary}
    if a.before:
        builds["before"] = a.before
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYON_NUM_THREADS=str(a.threads))
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": a.tokens, "temperature": 0})
    ports = {name: 3951 + i for i, name in enumerate(builds)}
    urls = {name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()}
    procs = {}
    load0 = os.getloadavg()
    try:
        for name, binary in builds.items():
            procs[name] = subprocess.Popen(
                [binary, "serve", "--model", f"{MODEL}=text-generation", "--port", str(ports[name]),
                 "--threads", str(a.threads), "--quiet"], env=env, stderr=subprocess.DEVNULL)
        for name in builds:
            wait_ready(f"http://127.0.0.1:{ports[name]}/ready", procs[name])
        # Warm-up: a burst at this concurrency, and one request alone.
        for name in builds:
            sse_load(client, urls[name], body, a.concurrency, 2 * a.concurrency)
            sse_load(client, urls[name], body, 1, 2)
        waves = {name: ([], []) for name in builds}
        for r in range(a.rounds):
            order = list(builds) if r % 2 == 0 else list(reversed(builds))
            for name in order:
                d = sse_load(client, urls[name], body, a.concurrency, a.requests)
                sent = sorted(zip(d["start_s"], d["ttft_s"]))
                for w in range(0, len(sent), a.concurrency):
                    slowest = max(t for _, t in sent[w:w + a.concurrency]) * 1e3
                    waves[name][0 if w == 0 else 1].append(slowest)
    finally:
        for p in procs.values():
            p.terminate()
    load1 = os.getloadavg()
    print(f"bursts of {a.concurrency} equal streamed chats x {a.tokens} tokens at an idle batch, "
          f"{a.requests // a.concurrency} waves a run, {a.rounds} runs a build, {a.threads} "
          f"threads; CPU {cpu_model()}; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| build | first waves: slowest TTFT median / p90 (ms) | later waves: median / p90 (ms) |")
    print("|---|---|---|")
    for name, (first, later) in waves.items():
        print(f"| {builds[name]} | {statistics.median(first):.1f} / {quantile(first, 0.9):.1f} "
              f"| {statistics.median(later):.1f} / {quantile(later, 0.9):.1f} (n={len(later)}) |")


if __name__ == "__main__":
    main()
