#!/usr/bin/env python3
"""The Python package against transformers in the same interpreter, side by side: import and
pipeline construction, first result, throughput and peak RSS; and against our own CLI on the
same work (the package should lose little to it).

  scripts/fetch-models.sh minilm smollm2 && cargo build --release -p ferroformers-cli
  pip install . transformers torch gguf      # one venv holding both packages
  python3 scripts/bench_python_pkg.py [--reps 3] [--threads 2] [--n 512]

Work (every engine gets the same inputs, threads and one warm-up call; the sentences are sorted
by length for all, as ours sorts within its batch windows):
  embed    all-MiniLM-L6-v2 mean-pooled, normalised embeddings of N sentences at batch 1 and 32.
           ferroformers: pipeline("sentence-embeddings"); transformers:
           pipeline("feature-extraction") + mean pooling and normalisation in numpy (what
           sentence-transformers computes); cli: `ferroformers run sentence-embeddings`.
  generate SmolLM2-135M-Instruct Q4_1 GGUF, one prompt, 64 greedy tokens (min_new_tokens = 64).
           ferroformers: default int8 GGUF arithmetic; transformers: the GGUF dequantized to f32
           (the only way it runs a GGUF); cli: the same as ferroformers.
Each measurement is its own process: import + construction (s), first result after process
start (s), items/s (sentences or new tokens per second, model loaded and warmed), peak RSS.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import cpu_model, timed, timing_line  # noqa: E402

PROMPT = "Once upon a time, there was"
NEW = 64


def hub_folder(repo_id):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, local_files_only=True)


def sentences(n):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bp", ROOT / "scripts" / "bench-python.py")
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    return sorted(bp.make_sentences(n), key=len)


def child(a):
    t0 = float(a.t0)
    texts = json.loads(Path(a.texts).read_text()) if a.texts else None
    if a.engine == "ferroformers":
        import ferroformers

        imported = time.time()
        if a.work == "embed":
            pipe = ferroformers.pipeline("sentence-embeddings", model=a.minilm, batch_size=a.batch)
            run = lambda xs: pipe(xs, pooling="mean", normalize=True)  # noqa: E731
        else:
            pipe = ferroformers.pipeline("text-generation", model=a.gguf)
            run = lambda xs: pipe(xs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)  # noqa: E731
    else:
        import torch
        import transformers

        torch.set_num_threads(a.threads)
        imported = time.time()
        if a.work == "embed":
            import numpy as np

            fe = transformers.pipeline("feature-extraction", model=a.minilm, device="cpu", batch_size=a.batch)

            # A list call returns each input's hidden states at its batch's padded length: pool
            # over the input's own tokens (counted once, outside the timing).
            lens = [len(fe.tokenizer(x)["input_ids"]) for x in texts]

            def run(xs):
                out = []
                for h, n in zip(fe(xs, return_tensors=True), lens):
                    v = h[0, :n].numpy().mean(0)
                    out.append((v / max(np.linalg.norm(v), 1e-12)).tolist())
                return out
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            d, name = os.path.split(a.gguf)
            tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()
            pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
            run = lambda xs: pipe(xs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)  # noqa: E731
    built = time.time()
    inputs = texts if a.work == "embed" else [PROMPT]
    first = run(inputs[:1])
    first_t = time.time()
    run(inputs[: min(len(inputs), 32)])  # warm-up
    t1 = time.perf_counter()
    out = run(inputs)
    secs = time.perf_counter() - t1
    items = len(out) if a.work == "embed" else NEW
    print(json.dumps({"import_s": imported - t0, "construct_s": built - imported, "first_s": first_t - t0,
                      "items_per_s": items / secs, "sample": str(first)[:80]}))


def run_cli(a, work, batch, files):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    if work == "embed":
        cmd = [a.binary, "run", "sentence-embeddings", "--model", "sentence-transformers/all-MiniLM-L6-v2",
               "--param", "pooling=mean", "--param", "normalize=true", "--batch-size", str(batch),
               "--threads", str(a.threads), "--input", files["texts_jsonl"], "--timing"]
    else:
        cmd = [a.binary, "run", "text-generation", "--model", a.gguf, "--threads", str(a.threads),
               "--param", f"max_new_tokens={NEW}", "--param", f"min_new_tokens={NEW}",
               "--param", "do_sample=false", "--timing", PROMPT]
    p, rss = timed(cmd, env)
    t = timing_line(p.stderr)
    items = t["inputs"] if work == "embed" else NEW
    return {"import_s": None, "construct_s": t["load_s"], "first_s": t["first_result_s"],
            "items_per_s": items / t["run_s"], "rss_mb": rss}


def run_child(a, engine, work, batch, files):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--work", work, "--batch", str(batch),
           "--threads", str(a.threads), "--gguf", a.gguf, "--minilm", a.minilm, "--t0", repr(time.time()),
           "--texts", files["texts_json"] if work == "embed" else ""]
    p, rss = timed(cmd, env)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["rss_mb"] = rss
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--engines", default="ferroformers,transformers,cli")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "ferroformers"))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--engine")
    ap.add_argument("--work")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gguf")
    ap.add_argument("--minilm")
    ap.add_argument("--texts")
    ap.add_argument("--t0")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    # Model folders resolved here, once: the children time only their own engine.
    a.gguf = str(Path(hub_folder("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF")) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    a.minilm = hub_folder("sentence-transformers/all-MiniLM-L6-v2")
    tmp = Path(tempfile.mkdtemp())
    texts = sentences(a.n)
    files = {"texts_json": str(tmp / "texts.json"), "texts_jsonl": str(tmp / "texts.jsonl")}
    Path(files["texts_json"]).write_text(json.dumps(texts))
    Path(files["texts_jsonl"]).write_text("".join(json.dumps(t) + "\n" for t in texts))
    engines = a.engines.split(",")
    runs = [("embed", 1), ("embed", 32), ("generate", 1)]
    res = {}
    load0 = os.getloadavg()
    for rep in range(a.reps):
        order = engines if rep % 2 == 0 else engines[::-1]
        for work, batch in runs:
            for e in order:
                r = run_cli(a, work, batch, files) if e == "cli" else run_child(a, e, work, batch, files)
                res.setdefault((work, batch, e), []).append(r)
                print(f"rep {rep} {work} b={batch} {e}: {r['items_per_s']:.1f}/s, first {r['first_s']:.2f} s, "
                      f"RSS {r['rss_mb']:.0f} MB", file=sys.stderr)
    load1 = os.getloadavg()
    med = lambda xs: statistics.median(xs) if xs and None not in xs else None  # noqa: E731
    print(f"\nPython package vs transformers, {a.threads} threads, median of {a.reps}; CPU {cpu_model()}; "
          f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; {a.n} sentences; {NEW} new tokens")
    print("| work | engine | import (s) | construct (s) | first result (s) | items/s | vs transformers | vs cli | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for work, batch in runs:
        rows = {e: res[(work, batch, e)] for e in engines}
        ips = {e: med([r["items_per_s"] for r in rows[e]]) for e in engines}
        for e in engines:
            g = lambda k: med([r[k] for r in rows[e]])  # noqa: E731
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            vs_t = f"{ips[e] / ips['transformers']:.2f}x" if "transformers" in ips else "-"
            vs_c = f"{ips[e] / ips['cli']:.2f}x" if "cli" in ips else "-"
            name = f"{work} b={batch}" if work == "embed" else "generate"
            print(f"| {name} | {e} | {fmt(g('import_s'))} | {fmt(g('construct_s'))} | {fmt(g('first_s'))} | "
                  f"{ips[e]:.1f} | {vs_t} | {vs_c} | {g('rss_mb'):.0f} |")


if __name__ == "__main__":
    main()
