#!/usr/bin/env python3
"""Encoders on long inputs: one input of 128, 384, 512 and 2048 tokens through a BERT-base-sized
encoder (random weights, seed 0, 2048 positions), warm process, one request at a time: ours
(f32, int8, bf16) against torch (transformers AutoModel, inference_mode) and ONNX Runtime (the
same weights exported with torch.onnx; f32, and quantize_dynamic int8). Every engine mean-pools
the last hidden state (ours through the feature-extraction pipeline's `pooling=mean`), so no
engine returns 2048 x 768 numbers as JSON. Same threads, warm-up 2, engines alternating per round;
prints medians and peak RSS per engine and length.

  cargo build --release -p ferroformers --example latency
  /work/venv/bench/bin/python scripts/bench_long.py [--lengths 128,384,512,2048] [--rounds 3]

The input is the same common words repeated (each one word piece), CLS ... SEP: exactly the
length asked for in every engine.
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
MODEL = Path(os.environ.get("FF_LONG_MODEL", "/tmp/ff-bench-long-bert"))
WORDS = "the cat sat on a mat and the dog ran to the park with a red ball".split()

PY_CHILD = r"""
import json, sys, time, os
engine, model, text, threads, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import numpy as np
from tokenizers import Tokenizer
tk = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
tk.no_truncation(); tk.no_padding()
def pool(h, m):
    m = m.astype(np.float32)[:, :, None]
    return (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
if engine.startswith("onnx"):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    path = os.path.join(model, "model-int8.onnx" if engine == "onnx-int8" else "model.onnx")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    def once():
        e = tk.encode(text)
        ids = np.array([e.ids], dtype=np.int64); m = np.array([e.attention_mask], dtype=np.int64)
        (h,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": m,
                                                "token_type_ids": np.zeros_like(ids)})
        return pool(h, m), len(e.ids)
else:
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModel
    net = AutoModel.from_pretrained(model).eval()
    def once():
        e = tk.encode(text)
        ids = torch.tensor([e.ids]); m = torch.tensor([e.attention_mask])
        with torch.inference_mode():
            h = net(input_ids=ids, attention_mask=m).last_hidden_state.numpy()
        return pool(h, m.numpy()), len(e.ids)
for _ in range(2):
    _, n = once()
ms = []
for _ in range(reps):
    t = time.perf_counter(); once(); ms.append((time.perf_counter() - t) * 1e3)
ms.sort()
print(json.dumps({"median_ms": ms[len(ms) // 2], "tokens": n}))
"""


def make_model():
    """A BERT-base-sized encoder with 2048 positions (seed 0), its tokenizer (MiniLM's BERT
    word pieces; `scripts/fetch-models.sh minilm`), and the ONNX exports (f32 and dynamic
    int8)."""
    if (MODEL / "model-int8.onnx").exists():
        return
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    sys.path.insert(0, str(ROOT / "scripts"))
    import importlib.util
    spec = importlib.util.spec_from_file_location("bp", ROOT / "scripts" / "bench-python.py")
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    torch.manual_seed(0)
    # MiniLM's BERT word pieces (30522), so that common words are one piece each.
    tok = BertTokenizerFast.from_pretrained(bp.snapshot_dir(bp.MINILM_ID, "minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=2048)
    model = BertModel(cfg).eval()
    MODEL.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL)
    tok.model_max_length = 2048
    tok.save_pretrained(MODEL)
    ids = torch.ones((1, 16), dtype=torch.long)
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(MODEL / "model.onnx"),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state", "pooler_output"],
                      dynamic_axes={n: {0: "b", 1: "s"} for n in
                                    ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
                      opset_version=17, dynamo=False)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(MODEL / "model.onnx"), str(MODEL / "model-int8.onnx"), weight_type=QuantType.QInt8)


def text_of(n):
    """n - 2 one-piece words (CLS and SEP make n)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n - 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="128,384,512,2048")
    ap.add_argument("--engines", default="ours,ours-int8,ours-bf16,torch,onnx,onnx-int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=str(ROOT / "target/release/examples/latency"))
    a = ap.parse_args()
    make_model()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    lengths = [int(x) for x in a.lengths.split(",")]
    engines = a.engines.split(",")
    res = {}
    load0 = os.getloadavg()
    for rnd in range(a.rounds):
        for n in lengths:
            reps = 20 if n <= 512 else 5
            text = text_of(n)
            order = engines if rnd % 2 == 0 else list(reversed(engines))
            for e in order:
                if e in OURS:
                    cmd = ["/usr/bin/time", "-f", "__RSS_KB__=%M", a.binary, "feature-extraction",
                           str(MODEL), json.dumps(text), "--reps", str(reps),
                           "--param", "pooling=mean"] + OURS[e]
                else:
                    cmd = ["/usr/bin/time", "-f", "__RSS_KB__=%M", sys.executable, "-c", PY_CHILD, e,
                           str(MODEL), text, str(a.threads), str(reps)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"{n} {e} failed:\n{p.stderr[-3000:]}")
                out = json.loads(p.stdout.strip().splitlines()[-1])
                # Peak RSS of the whole process (/usr/bin/time), for every engine.
                out["rss_mb"] = next(int(l.split("=")[1]) for l in p.stderr.splitlines()
                                     if l.startswith("__RSS_KB__=")) / 1024
                if e not in OURS and out["tokens"] != n:
                    sys.exit(f"{e}: {out['tokens']} tokens, not {n}")
                res.setdefault((n, e), []).append(out)
                print(f"round {rnd} {n} tokens {e}: {out['median_ms']:.1f} ms, {out['rss_mb']:.0f} MB",
                      file=sys.stderr)
    load1 = os.getloadavg()
    print(f"\nOne input of N tokens, BERT-base-sized encoder (random, 2048 positions), mean-pooled, warm, "
          f"{a.threads} threads, median over {a.rounds} rounds of each run's median; CPU {cpu_model()}; "
          f"load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| tokens | " + " | ".join(engines) + " | ours f32 vs torch | ours f32 vs ONNX Runtime |")
    print("|---|" + "---|" * (len(engines) + 2))
    for n in lengths:
        med = {e: statistics.median(r["median_ms"] for r in res[(n, e)]) for e in engines}
        cells = [f"{med[e]:.1f} ms ({max(r['rss_mb'] for r in res[(n, e)]):.0f} MB)" for e in engines]
        vs = [f"{med[p] / med['ours']:.2f}x" if "ours" in med and p in med else "-" for p in ("torch", "onnx")]
        print(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(vs) + " |")


if __name__ == "__main__":
    main()
