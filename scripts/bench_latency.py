#!/usr/bin/env python3
"""Latency of one request in a warm process: one MiniLM sentence (embedding, mean pooled and
normalised) and one question-answering question (BERT-base-sized random model from
scripts/bench_qa.py, ~300-word context), each engine loading once, warming up 5 times, then
timing REPS single requests in a row. Same threads for every engine; engines alternate.

  scripts/fetch-models.sh minilm onnx
  cargo build --release -p ferroformers --example latency
  python3 scripts/bench_latency.py [--reps 50] [--threads 2] [--rounds 3]

Engines: ours (f32), ours-int8, ours-bf16 (the `latency` example: the library's pipeline),
onnx / onnx-int8 (MiniLM: tokenizers + InferenceSession + numpy pooling, as bench-python.py),
torch (MiniLM: tokenizer + AutoModel under inference_mode + pooling; QA: the transformers
pipeline, which does the same windows and span search as ours).
Prints median milliseconds per request (median over rounds of each round's median).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchlib import OURS, cpu_model

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "A young engineer carefully repaired the broken window before dinner."

PY_CHILD = r"""
import json, sys, time, os
engine, what, threads, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
payload = json.loads(sys.argv[5])
sys.path.insert(0, os.path.join(sys.argv[6], "scripts"))
import importlib.util
spec = importlib.util.spec_from_file_location("bp", os.path.join(sys.argv[6], "scripts", "bench-python.py"))
bp = importlib.util.module_from_spec(spec); spec.loader.exec_module(bp)
import numpy as np
if engine.startswith("onnx"):
    tk, sess, names = bp.onnx_setup(threads, int8=engine == "onnx-int8")
    def once():
        e = tk.encode(payload)
        ids = np.array([e.ids], dtype=np.int64)
        mask = np.array([e.attention_mask], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.array([e.type_ids], dtype=np.int64)
        (h,) = sess.run(["last_hidden_state"], feeds)
        return bp.pool(h, mask)
else:
    import torch
    torch.set_num_threads(threads)
    if what == "minilm":
        from transformers import AutoModel, AutoTokenizer
        snap = bp.snapshot_dir(bp.MINILM_ID, "minilm")
        tok = AutoTokenizer.from_pretrained(snap)
        model = AutoModel.from_pretrained(snap).eval()
        def once():
            with torch.inference_mode():
                enc = tok(payload, return_tensors="pt")
                h = model(**enc).last_hidden_state.numpy()
            return bp.pool(h, enc["attention_mask"].numpy())
    else:
        from transformers import pipeline
        qa = pipeline("question-answering", model=sys.argv[7], tokenizer=sys.argv[7])
        def once():
            with torch.inference_mode():
                return qa(payload)
for _ in range(5):
    once()
ms = []
for _ in range(reps):
    t = time.perf_counter(); once(); ms.append((time.perf_counter() - t) * 1e3)
ms.sort()
print(json.dumps({"median_ms": ms[len(ms) // 2]}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=str(ROOT / "target/release/examples/latency"))
    args = ap.parse_args()
    import bench_qa
    bench_qa.make_model()
    pair = bench_qa.make_pairs(1)[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    cases = {
        "minilm": (["ours", "ours-int8", "ours-bf16", "onnx", "onnx-int8", "torch"], SENTENCE),
        "qa": (["ours", "ours-int8", "ours-bf16", "torch"], pair),
    }
    res = {}
    load0 = os.getloadavg()
    for rnd in range(args.rounds):
        for what, (engines, payload) in cases.items():
            order = engines if rnd % 2 == 0 else list(reversed(engines))
            for e in order:
                if e in OURS:
                    task, model = (("feature-extraction", "sentence-transformers/all-MiniLM-L6-v2")
                                   if what == "minilm" else ("question-answering", str(bench_qa.MODEL)))
                    cmd = [args.binary, task, model, json.dumps(payload), "--reps", str(args.reps)]
                    if what == "minilm":
                        cmd += ["--param", "pooling=mean", "--param", "normalize=true"]
                    cmd += OURS[e]
                else:
                    cmd = [sys.executable, "-c", PY_CHILD, e, what, str(args.threads), str(args.reps),
                           json.dumps(payload), str(ROOT), str(bench_qa.MODEL)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"{what} {e} failed:\n{p.stderr[-3000:]}")
                ms = json.loads(p.stdout.strip().splitlines()[-1])["median_ms"]
                res.setdefault((what, e), []).append(ms)
                print(f"round {rnd} {what} {e}: {ms:.2f} ms", file=sys.stderr)
    load1 = os.getloadavg()
    cpu = cpu_model()
    print(f"\nOne request at a time, warm, {args.threads} threads, median of {args.reps} requests, "
          f"median of {args.rounds} rounds; CPU {cpu}; load average before {load0[0]:.2f}, "
          f"after {load1[0]:.2f}")
    print("| request | engine | ms | vs ours f32 |")
    print("|---|---|---|---|")
    for what, (engines, _) in cases.items():
        base = statistics.median(res[(what, "ours")])
        for e in engines:
            v = statistics.median(res[(what, e)])
            print(f"| {what} | {e} | {v:.2f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
