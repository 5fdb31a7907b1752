#!/usr/bin/env python3
"""Feature-extraction benchmark: ferroformers vs Python transformers (torch) vs ONNX Runtime.

Embeds the same 256 short sentences (mean pooled, L2-normalised) with
sentence-transformers/all-MiniLM-L6-v2 at batch 1 and batch 32, same thread count for every
engine, alternating engines within each repetition so machine load hits all of them alike.

  scripts/fetch-models.sh minilm onnx
  pip install -r scripts/requirements-fixtures.txt -r scripts/requirements-bench.txt
  cargo build --release -p ferroformers-cli
  python3 scripts/bench.py [--reps 3] [--threads 2] [--engines ours,torch,onnx] [--batches 1,32]

Engines: ours (f32), ours-int8 (`--quantize int8`), ours-bf16 (`--dtype bf16`), torch (transformers pipeline, f32), onnx
(ONNX Runtime f32), onnx-int8 (ONNX Runtime on `quantize_dynamic` of the same ONNX file).
Every engine embeds the inputs in order of token length (as ours batches them), same threads,
no warm-up pass for any.

Per run it records:
  sentences/s        n / seconds spent embedding (model already loaded), as each engine times it
  first result (s)   process start -> first embedding available (includes imports and loading)
  peak RSS (MB)      the child's maximum resident set size (/usr/bin/time %M)
and prints medians over the repetitions, ratios against torch and ours, the mean cosine of
each engine's embeddings against the f32 ones of the same family (int8 engines), the CPU model
and the load average seen.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import OURS, cpu_model, timed, timing_line

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def load_bench_python():
    spec = importlib.util.spec_from_file_location("bench_python", ROOT / "scripts" / "bench-python.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_ours(binary, sentences_file, batch, threads, engine="ours"):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [str(binary), "run", "feature-extraction", "--model", MODEL, "--param", "pooling=mean",
           "--param", "normalize=true", "--batch-size", str(batch), "--threads", str(threads),
           "--input", str(sentences_file), "--timing"]
    cmd += OURS[engine]
    p, rss = timed(cmd, env)
    timing = timing_line(p.stderr)
    n = timing["inputs"]
    lines = p.stdout.splitlines()
    assert len(lines) == n
    return {"sentences_per_s": n / timing["run_s"], "first_result_s": timing["first_result_s"],
            "peak_rss_mb": rss}, [json.loads(x) for x in lines]


def run_python(engine, batch, threads, n, dump):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench-python.py"), "--engine", engine,
           "--batch-size", str(batch), "--threads", str(threads), "--n", str(n),
           "--dump", str(dump)]
    p, rss = timed(cmd, env)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    import numpy as np
    return {"sentences_per_s": r["sentences_per_s"], "first_result_s": r["time_to_first_result_s"],
            "peak_rss_mb": rss}, np.load(dump).tolist()


def mean_cosine(a, b):
    import numpy as np
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean()), float(cos.min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--engines", default="ours,torch,onnx")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "ferroformers"))
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    args = ap.parse_args()

    bp = load_bench_python()
    sentences = bp.make_sentences(args.n)
    tmp = Path(tempfile.mkdtemp())
    sfile = tmp / "sentences.jsonl"
    sfile.write_text("".join(json.dumps(s) + "\n" for s in sentences))

    engines = args.engines.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    embeddings = {}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        order = engines if rep % 2 == 0 else list(reversed(engines))
        for batch in batches:
            for e in order:
                if e in OURS:
                    r, emb = run_ours(args.binary, sfile, batch, args.threads, e)
                else:
                    r, emb = run_python(e, batch, args.threads, args.n, tmp / "emb.npy")
                results.setdefault((e, batch), []).append(r)
                embeddings.setdefault((e, batch), emb)
                print(f"rep {rep} {e:5} batch {batch:2}: {r['sentences_per_s']:7.1f} sent/s, "
                      f"first {r['first_result_s']:.3f} s, RSS {r['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
    load_after = os.getloadavg()

    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
    print(f"\nall-MiniLM-L6-v2, {args.n} sentences, {args.threads} threads, "
          f"median of {args.reps}; CPU {cpu_model()}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("| engine | batch | sentences/s | vs torch | vs ours | first result (s) "
          "| peak RSS (MB) | cosine vs f32 (mean / min) |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in batches:
        base = med.get(("torch", batch))
        ours = med.get(("ours", batch))
        for e in engines:
            m = med[(e, batch)]
            ratio = f"{m['sentences_per_s'] / base['sentences_per_s']:.2f}x" if base else "-"
            vs_ours = f"{m['sentences_per_s'] / ours['sentences_per_s']:.2f}x" if ours else "-"
            ref = {"ours-int8": "ours", "ours-bf16": "ours", "onnx-int8": "onnx"}.get(e)
            cos = "-"
            if ref and (ref, batch) in embeddings:
                mean, low = mean_cosine(embeddings[(e, batch)], embeddings[(ref, batch)])
                cos = f"{mean:.5f} / {low:.5f}"
            print(f"| {e} | {batch} | {m['sentences_per_s']:.1f} | {ratio} | {vs_ours} | "
                  f"{m['first_result_s']:.3f} | {m['peak_rss_mb']:.0f} | {cos} |")
    if args.json:
        args.json.write_text(json.dumps({f"{e}/{b}": v for (e, b), v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
