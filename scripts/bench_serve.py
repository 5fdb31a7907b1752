#!/usr/bin/env python3
"""Serving throughput: `ferroformers serve` against a Python server around sentence-transformers,
both answering TEI's `POST /embed` with all-MiniLM-L6-v2, under the same load, side by side.

  scripts/fetch-models.sh minilm && cargo build --release -p ferroformers-cli
  apt-get install hey       (the load generator, Debian)
  pip install sentence-transformers==5.1.2   (in the Python that runs this script)
  python3 scripts/bench_serve.py [--concurrency 1,8,32] [--requests 2000] [--reps 3] [--threads 2]

Load: `hey -n REQUESTS -c C -m POST` with one sentence per request (`{"inputs": "..."}`), after
a warm-up of 50 requests per server. Engines alternate within each repetition; medians of the
repetitions. Reported: requests/s, p50 and p99 latency (hey's), and each server's peak RSS.

The Python peer: `http.server.ThreadingHTTPServer` (a thread per connection, keep-alive,
TCP_NODELAY), the model loaded
once with `SentenceTransformer`, `encode(..., normalize_embeddings=True)` per request (what TEI's
`/embed` returns), `torch.set_num_threads(T)` (`--peer-threads N`: N instead; on a 2-core Ice
Lake it answered 40-41 requests/s at concurrency 32 with 1 thread against 32-33 with 2, each of
its request threads running `encode` with its own torch threads). Ours: `ferroformers serve --threads T` with its
default dynamic batching (no batch wait). Both on 127.0.0.1; hey runs on the same 2 cores.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import cpu_model, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."

PY_SERVER = r"""
import json, sys, torch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from sentence_transformers import SentenceTransformer
port, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
model = SentenceTransformer(sys.argv[3], device="cpu")
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without TCP_NODELAY the separate header and body writes meet delayed ACKs (~40 ms).
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        inputs = body["inputs"]
        texts = [inputs] if isinstance(inputs, str) else inputs
        with torch.inference_mode():
            emb = model.encode(texts, normalize_embeddings=True, batch_size=32)
        out = json.dumps(emb.tolist()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def peak_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hey(url, n, c, body_file):
    p = subprocess.run(["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", "application/json",
                        "-D", body_file, url], capture_output=True, text=True, check=True)
    out = p.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)}
    codes = re.findall(r"\[(\d+)\]\s+(\d+) responses", out)
    bad = sum(int(k) for code, k in codes if code != "200")
    return {"rps": rps, "p50_ms": lat.get("50", float("nan")) * 1000,
            "p99_ms": lat.get("99", float("nan")) * 1000, "non_200": bad}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-threads", type=int,
                    help="the Python server's torch threads (default: --threads), to give it its "
                         "best where fewer run faster beside its request threads")
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    a = ap.parse_args()
    peer_threads = str(a.peer_threads or a.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    ours = subprocess.Popen([a.binary, "serve", "--model", MODEL, "--port", "3931", "--threads",
                             str(a.threads)], env=env, stderr=subprocess.DEVNULL)
    peer = subprocess.Popen([sys.executable, "-c", PY_SERVER, "3932", peer_threads, MODEL],
                            env=dict(env, OMP_NUM_THREADS=peer_threads), stderr=subprocess.DEVNULL)
    servers = {"ours": ("http://127.0.0.1:3931", ours), "python": ("http://127.0.0.1:3932", peer)}
    res = {}
    load0 = os.getloadavg()
    try:
        for name, (base, proc) in servers.items():
            wait_ready(base + "/health", proc, timeout=120)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"inputs": SENTENCE}, f)
            body = f.name
        for name, (base, _) in servers.items():
            hey(base + "/embed", 50, 4, body)
        conc = [int(c) for c in a.concurrency.split(",")]
        for rep in range(a.reps):
            order = list(servers) if rep % 2 == 0 else list(reversed(servers))
            for c in conc:
                for name in order:
                    r = hey(servers[name][0] + "/embed", a.requests, c, body)
                    res.setdefault((name, c), []).append(r)
                    print(f"rep {rep} c={c} {name}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
                          f"p99 {r['p99_ms']:.1f} ms, non-200 {r['non_200']}", file=sys.stderr)
        rss = {name: peak_rss_mb(proc.pid) for name, (_, proc) in servers.items()}
    finally:
        for _, proc in servers.values():
            proc.terminate()
    load1 = os.getloadavg()
    print(f"\nPOST /embed, one sentence per request, {a.requests} requests per run, {a.threads} threads"
          f"{f' (Python: {a.peer_threads})' if a.peer_threads else ''}, "
          f"median of {a.reps}; CPU {cpu_model()}; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| server | concurrency | requests/s | vs Python | p50 (ms) | p99 (ms) | non-200 |")
    print("|---|---|---|---|---|---|---|")
    for c in conc:
        base = statistics.median(r["rps"] for r in res[("python", c)])
        for name, label in (("ours", "ferroformers serve"), ("python", "Python (sentence-transformers)")):
            rs = res[(name, c)]
            rps = statistics.median(r["rps"] for r in rs)
            print(f"| {label} | {c} | {rps:.0f} | {rps / base:.2f}x | "
                  f"{statistics.median(r['p50_ms'] for r in rs):.1f} | "
                  f"{statistics.median(r['p99_ms'] for r in rs):.1f} | {sum(r['non_200'] for r in rs)} |")
    print(f"\npeak RSS: ours {rss['ours']:.0f} MB, Python {rss['python']:.0f} MB")


if __name__ == "__main__":
    main()
