#!/usr/bin/env python3
"""Long prompts arriving while streams decode: `ferroformers serve` with its prompt passes cut
into chunks (`--max-batch-prefill-tokens N`) against the same binary with them whole (N larger
than any prompt), side by side on the real SmolLM2 GGUF.

  scripts/fetch-models.sh smollm2 && cargo build --release -p ferroformers-cli
  python3 scripts/bench_serve_long.py [--chunks 128,256,512,0] [--streams 8] [--longs 4]
      [--long-words 900] [--reps 3] [--cancel-after-ms 0]

Each run: `--streams` client threads each send streamed chat completions (a short chat, 64
tokens, temperature 0) one after another for the whole run; meanwhile one more thread sends
`--longs` long chats one after another, 1 s apart (a different text each, ~1.3 tokens per
word of `--long-words`, 8 new tokens each). The short streams record the gap between each two
content events (a long prompt's pass holds up every running stream's next token: that stall is
what chunking bounds), the long requests their time to first token. With `--cancel-after-ms
MS` the long requests' clients hang up MS after sending instead (a client that gave up): the
gaps then show how soon the server stops working for them.

Chunk sizes alternate within each repetition (0: whole prompts; `--before BINARY`: an earlier
build, whose prompts ran whole); medians over repetitions of
each run's p50/p99/max gap. Every server gets `--threads`; the CPU model and the load average
are printed with the table. The clients are Python threads asleep on their sockets.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import cpu_model

ROOT = Path(__file__).resolve().parent.parent
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SHORT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
WORDS = ("the keeper climbed the stairs each night to light the lamp while storms rolled in "
         "from the north and ships passed far out at sea carrying grain and timber to the "
         "southern ports ").split()


def long_chat(i, words):
    text = " ".join(WORDS[j % len(WORDS)] for j in range(words))
    return [{"role": "user", "content": f"Request {i}. Summarize this log: {text}"}]


def stream(port, messages, tokens, gaps=None, cancel_after=None):
    """One streamed chat: (seconds to the first content event, content events); each gap
    between two content events appended to `gaps`. `cancel_after` seconds: hang up then."""
    body = json.dumps({"model": REPO, "messages": messages, "max_tokens": tokens,
                       "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    if cancel_after is not None:
        time.sleep(cancel_after)
        conn.sock.shutdown(2)
        conn.close()
        return None, 0
    r = conn.getresponse()
    if r.status != 200:
        sys.exit(f"status {r.status}: {r.read()[:300]}")
    first, last, events = None, None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        chunk = json.loads(line[6:])
        for ch in chunk.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                now = time.perf_counter()
                events += 1
                if first is None:
                    first = now - t0
                elif gaps is not None:
                    gaps.append(now - last)
                last = now
    conn.close()
    return first, events


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def one_run(port, a, run):
    stop = threading.Event()
    gaps, tokens = [], [0]
    lock = threading.Lock()

    def short_client():
        while not stop.is_set():
            g = []
            _, n = stream(port, SHORT, 64, g)
            with lock:
                gaps.extend(g)
                tokens[0] += n

    threads = [threading.Thread(target=short_client) for _ in range(a.streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(1.0)
    long_ttft = []
    for i in range(a.longs):
        cancel = a.cancel_after_ms / 1000 if a.cancel_after_ms > 0 else None
        first, _ = stream(port, long_chat(f"{run}-{i}", a.long_words), 8, cancel_after=cancel)
        if first is not None:
            long_ttft.append(first)
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"gap_p50": 1e3 * pct(gaps, 0.5), "gap_p99": 1e3 * pct(gaps, 0.99),
            "gap_max": 1e3 * max(gaps), "long_ttft": 1e3 * statistics.median(long_ttft)
            if long_ttft else float("nan"), "tok_s": tokens[0] / wall}


def metric(port, name):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="128,256,512,0", help="--max-batch-prefill-tokens values; 0: whole prompts")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--longs", type=int, default=4)
    ap.add_argument("--long-words", type=int, default=900)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cancel-after-ms", type=int, default=0)
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--before", help="an earlier ferroformers binary (without the flag), served "
                                     "beside the others and measured in the same rounds")
    a = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    chunks = [int(c) for c in a.chunks.split(",")] + (["before"] if a.before else [])
    servers = {}
    for k, c in enumerate(chunks):
        port = 3960 + k
        cmd = [a.before if c == "before" else a.binary, "serve", "--model",
               f"{REPO}=text-generation", "--threads", str(a.threads), "--quiet", "--port", str(port)]
        if c != "before":
            cmd += ["--max-batch-prefill-tokens", str(c or 1_000_000)]
        servers[c] = (port, subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
    res = {}
    names = {0: "whole prompts", "before": "--before binary"}
    load0 = os.getloadavg()
    try:
        for port, proc in servers.values():
            for _ in range(360):
                if proc.poll() is not None:
                    sys.exit("server exited")
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/health")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            # Warm-up: a run with one long prompt (the batch's buffers grow to their size).
            warm = argparse.Namespace(**dict(vars(a), longs=1, cancel_after_ms=0))
            one_run(port, warm, "warmup")
        for rep in range(a.reps):
            order = chunks if rep % 2 == 0 else list(reversed(chunks))
            for c in order:
                # Only one server works at a time; the others are idle.
                r = one_run(servers[c][0], a, f"{rep}.{c}")
                res.setdefault(c, []).append(r)
                print(f"rep {rep} chunk {names.get(c, c)}: gaps p50 {r['gap_p50']:.0f} p99 "
                      f"{r['gap_p99']:.0f} max {r['gap_max']:.0f} ms, long TTFT "
                      f"{r['long_ttft']:.0f} ms, {r['tok_s']:.1f} tok/s", file=sys.stderr)
        cancelled = {c: metric(p, "ferroformers_generation_cancelled_prompts_total")
                     for c, (p, _) in servers.items()}
    finally:
        for _, proc in servers.values():
            proc.terminate()
    load1 = os.getloadavg()
    what = (f"long clients hang up after {a.cancel_after_ms} ms" if a.cancel_after_ms
            else "long requests answered (8 tokens)")
    print(f"\n{a.streams} short streams (64 tokens each, back to back) + {a.longs} long chats "
          f"(~{a.long_words} words) 1 s apart, {what}; SmolLM2-135M-Instruct Q4_1, "
          f"{a.threads} threads, median of {a.reps}; CPU {cpu_model()}; load average before "
          f"{load0[0]:.2f}, after {load1[0]:.2f}")
    print("| --max-batch-prefill-tokens | stream gap p50 (ms) | p99 (ms) | max (ms) | "
          "long TTFT (ms) | short tokens/s | prompts cancelled |")
    print("|---|---|---|---|---|---|---|")
    for c in chunks:
        rs = res[c]
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"| {names.get(c, c)} | {med('gap_p50'):.0f} | {med('gap_p99'):.0f} | "
              f"{med('gap_max'):.0f} | {med('long_ttft'):.0f} | {med('tok_s'):.1f} | "
              f"{cancelled[c]:.0f} |")


if __name__ == "__main__":
    main()
