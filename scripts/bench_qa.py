#!/usr/bin/env python3
"""Question-answering benchmark: ferroformers vs Python transformers 4.57 on a BERT-base-sized
random model (hidden 768, 12 layers, 12 heads), 64 (question, ~300-word context) pairs.

  cargo build --release -p ferroformers-cli
  python3 scripts/bench_qa.py [--reps 3] [--threads 2] [--batch-sizes 1,8]
                              [--engines ours,ours-int8,python]

The model is generated (seeded) into bench-out/bert-base-qa/ with the fixture WordPiece
tokenizer (tests/fixtures/models/bert-qa); the weights are random, so answers are meaningless,
but the work (windows of 384 tokens, stride 128, span search) is the real pipeline's.
Engines: ours (f32), ours-int8 (`--quantize int8`), ours-bf16 (`--dtype bf16`), python (transformers + torch, f32).
Engines alternate within each repetition; medians are reported with the load average and the
CPU model; ours-int8's answers are compared with ours' (same span for how many pairs).
"""
import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import OURS, cpu_model, timed, timing_line

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"
MODEL = OUT / "bert-base-qa"


def make_model():
    if (MODEL / "model.safetensors").exists():
        return
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    torch.manual_seed(0)
    tok = BertTokenizerFast.from_pretrained(ROOT / "tests/fixtures/models/bert-qa")
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)
    model = BertForQuestionAnswering(cfg).eval()
    MODEL.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL)
    tok.model_max_length = 512
    tok.save_pretrained(MODEL)


def work_gflop(pairs):
    """The arithmetic of one run at batch 1 (no padding): the windows the pipeline makes
    (max_seq_len 384, doc_stride 128) and, per window of L tokens, each layer's products
    (2 L h 3h for Q/K/V, 2 L h h out, 2 * 2 L h i feed-forward, 2 * 2 L^2 h attention)."""
    from transformers import AutoTokenizer
    cfg = json.loads((MODEL / "config.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(MODEL)
    windows, flop = 0, 0.0
    for p in pairs:
        enc = tok(p["question"], p["context"], truncation="only_second", max_length=384,
                  stride=128, return_overflowing_tokens=True)
        for ids in enc["input_ids"]:
            n = len(ids)
            windows += 1
            flop += layers * (2 * n * h * (3 * h + h + 2 * i) + 4 * n * n * h)
    return windows, flop / 1e9


def make_pairs(n=64):
    words = (ROOT / "scripts/corpus.txt").read_text().split()
    rng = random.Random(0)
    pairs = []
    for i in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(300))
        q = " ".join(rng.choice(words) for _ in range(8)) + "?"
        pairs.append({"question": q, "context": ctx})
    return pairs


PY_CHILD = r"""
import time; T0 = time.perf_counter()
import json, sys, torch
from transformers import pipeline
torch.set_num_threads(int(sys.argv[2]))
pairs = [json.loads(l) for l in open(sys.argv[1])]
qa = pipeline("question-answering", model=sys.argv[3], tokenizer=sys.argv[3])
t1 = time.perf_counter()
out = qa(pairs, batch_size=int(sys.argv[4]))
t2 = time.perf_counter()
print(json.dumps({"run_s": t2 - t1, "total_s": t2 - T0, "n": len(out)}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--engines", default="ours,ours-int8,python")
    args = ap.parse_args()
    names = args.engines.split(",")
    make_model()
    tmp = Path(tempfile.mkdtemp())
    pairs_file = tmp / "pairs.jsonl"
    pairs = make_pairs()
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    child = tmp / "child.py"
    child.write_text(PY_CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    res = {}
    answers = {}
    load0 = os.getloadavg()
    for rep in range(args.reps):
        engines = names if rep % 2 == 0 else list(reversed(names))
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            for e in engines:
                if e in OURS:
                    cmd = [args.binary, "run", "question-answering", "--model", str(MODEL),
                           "--batch-size", str(bs), "--threads", str(args.threads),
                           "--input", str(pairs_file), "--timing"] + OURS[e]
                    p, rss = timed(cmd, env)
                    run_s = timing_line(p.stderr)["run_s"]
                    answers.setdefault(e, [json.loads(x) for x in p.stdout.splitlines()])
                else:
                    p, rss = timed([sys.executable, str(child), str(pairs_file), str(args.threads),
                                    str(MODEL), str(bs)], env)
                    run_s = json.loads(p.stdout.strip().splitlines()[-1])["run_s"]
                r = {"pairs_per_s": len(pairs) / run_s, "rss_mb": rss}
                res.setdefault((e, bs), []).append(r)
                print(f"rep {rep} {e:6} batch {bs}: {r['pairs_per_s']:.2f} pairs/s, RSS {rss:.0f} MB",
                      file=sys.stderr)
    load1 = os.getloadavg()
    cpu = cpu_model()
    print(f"\nQA, BERT-base-sized random model, 64 pairs x ~300-word context, {args.threads} threads, "
          f"median of {args.reps}; CPU {cpu}; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| engine | batch | pairs/s | vs python | vs ours | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        med = {e: statistics.median(r["pairs_per_s"] for r in res[(e, bs)]) for e in names}
        for e in names:
            v = med[e]
            rss = statistics.median(r["rss_mb"] for r in res[(e, bs)])
            py = f"{v / med['python']:.2f}x" if "python" in med else "-"
            ours = f"{v / med['ours']:.2f}x" if "ours" in med else "-"
            print(f"| {e} | {bs} | {v:.2f} | {py} | {ours} | {rss:.0f} |")
    for e in ("ours-int8", "ours-bf16"):
        if "ours" in answers and e in answers:
            same = sum(a.get("start") == b.get("start") and a.get("end") == b.get("end")
                       for a, b in zip(answers["ours"], answers[e]))
            print(f"\n{e} gives ours' answer span for {same} of {len(answers['ours'])} pairs "
                  "(random weights: scores are near ties, so this is a worst case)")
    windows, gflop = work_gflop(pairs)
    print(f"\nWork at batch 1: {windows} windows, {gflop:.0f} GFLOP of products per run "
          f"(larger batches add padding). Achieved, per core ({args.threads} threads):")
    for e in names:
        v = statistics.median(r["pairs_per_s"] for r in res[(e, 1)]) if (e, 1) in res else None
        if v:
            rate = gflop * v / len(pairs) / args.threads
            print(f"- {e}: {rate:.0f} GFLOP/s per core at batch 1")
    print("Compare with the FMA peak: cargo run --release -p ferroformers --example fma_peak")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
