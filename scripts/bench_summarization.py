#!/usr/bin/env python3
"""Summarization benchmark: ferroformers vs Python transformers 4.57 on a T5-small-sized random
model (d_model 512, 6+6 layers, 8 heads, d_ff 2048), 16 paragraphs, greedy and num_beams=4.

  cargo build --release -p ferroformers-cli
  python3 scripts/bench_summarization.py [--reps 2] [--threads 2]

The model is generated (seeded) into bench-out/t5-small-random/ with the fixture T5 tokenizer
(tests/fixtures/seq2seq/models/t5). Weights are random, so summaries are noise, but both engines
run the same number of decoding steps: min_length = max_length = 32 new tokens (eos suppressed
until then) so greedy/beam work is fixed.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import timed, timing_line

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "bench-out" / "t5-small-random"


def make_model():
    if (MODEL / "model.safetensors").exists():
        return
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

    torch.manual_seed(0)
    tok = T5TokenizerFast.from_pretrained(ROOT / "tests/fixtures/seq2seq/models/t5")
    cfg = T5Config(vocab_size=len(tok), d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                   num_decoder_layers=6, num_heads=8, feed_forward_proj="relu",
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg).eval()
    MODEL.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL)
    tok.save_pretrained(MODEL)


def paragraphs(n=16):
    words = (ROOT / "scripts/corpus.txt").read_text().split()
    rng = random.Random(1)
    return [" ".join(rng.choice(words) for _ in range(120)) for _ in range(n)]


PY_CHILD = r"""
import json, sys, time, torch
from transformers import pipeline
torch.set_num_threads(int(sys.argv[2]))
texts = [json.loads(l) for l in open(sys.argv[1])]
params = json.loads(sys.argv[4])
s = pipeline("summarization", model=sys.argv[3], tokenizer=sys.argv[3])
t1 = time.perf_counter()
for t in texts:
    s(t, **params)
print(json.dumps({"run_s": time.perf_counter() - t1}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    args = ap.parse_args()
    make_model()
    tmp = Path(tempfile.mkdtemp())
    texts = paragraphs()
    f = tmp / "texts.jsonl"
    f.write_text("".join(json.dumps(t) + "\n" for t in texts))
    child = tmp / "child.py"
    child.write_text(PY_CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    modes = {"greedy": {"num_beams": 1}, "beam4": {"num_beams": 4}}
    res = {}
    load0 = os.getloadavg()
    for rep in range(args.reps):
        engines = ["ours", "python"] if rep % 2 == 0 else ["python", "ours"]
        for mode, extra in modes.items():
            params = dict(extra, min_new_tokens=32, max_new_tokens=32, do_sample=False,
                          no_repeat_ngram_size=0, early_stopping=False)
            for e in engines:
                if e == "ours":
                    cmd = [args.binary, "run", "summarization", "--model", str(MODEL),
                           "--threads", str(args.threads), "--input", str(f), "--timing"]
                    for k, v in params.items():
                        cmd += ["--param", f"{k}={json.dumps(v)}"]
                    p, rss = timed(cmd, env)
                    run_s = timing_line(p.stderr)["run_s"]
                else:
                    p, rss = timed([sys.executable, str(child), str(f), str(args.threads), str(MODEL),
                                  json.dumps(params)], env)
                    run_s = json.loads(p.stdout.strip().splitlines()[-1])["run_s"]
                r = {"texts_per_s": len(texts) / run_s, "rss_mb": rss}
                res.setdefault((e, mode), []).append(r)
                print(f"rep {rep} {e:6} {mode}: {r['texts_per_s']:.2f} texts/s, RSS {rss:.0f} MB",
                      file=sys.stderr)
    load1 = os.getloadavg()
    print(f"\nsummarization, T5-small-sized random model, 16 paragraphs x 120 words, 32 new tokens, "
          f"{args.threads} threads, median of {args.reps}; load average before {load0[0]:.2f}, "
          f"after {load1[0]:.2f}")
    print("| engine | search | texts/s | vs python | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for mode in modes:
        py = statistics.median(r["texts_per_s"] for r in res[("python", mode)])
        for e in ["ours", "python"]:
            v = statistics.median(r["texts_per_s"] for r in res[(e, mode)])
            rss = statistics.median(r["rss_mb"] for r in res[(e, mode)])
            print(f"| {e} | {mode} | {v:.2f} | {v / py:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
