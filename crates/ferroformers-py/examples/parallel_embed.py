#!/usr/bin/env python3
"""Scale a batch job over processes (and so over machines, with any scheduler that runs Python
functions): each worker process loads one pipeline once and embeds its share of the inputs.

  python3 crates/ferroformers-py/examples/parallel_embed.py [--workers 2] [--n 2000]

Inside one process the engine already uses every core; several processes suit a job split over
hosts, or several models. Each worker here gets RAYON_NUM_THREADS=1, so N workers use N cores.
The same `embed_chunk` function works as a Ray Data `map_batches` or a Spark `mapInPandas` body.
"""
import argparse
import os
import time
from multiprocessing import get_context

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_pipe = None


def _init():
    global _pipe
    from ferroformers import pipeline

    _pipe = pipeline("sentence-embeddings", model=MODEL, batch_size=32)


def embed_chunk(texts):
    """One worker's share: mean-pooled, normalised embeddings, one list of floats per text."""
    return _pipe(list(texts), pooling="mean", normalize=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    texts = [f"Sentence number {i} about {['cats', 'the sea', 'rockets', 'bread'][i % 4]}." for i in range(a.n)]
    chunks = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    os.environ["RAYON_NUM_THREADS"] = "1"  # inherited by the workers: one core each
    t = time.perf_counter()
    with get_context("spawn").Pool(a.workers, initializer=_init) as pool:
        out = [v for part in pool.map(embed_chunk, chunks) for v in part]
    secs = time.perf_counter() - t
    print(f"{len(out)} embeddings of {len(out[0])} values with {a.workers} workers in {secs:.2f} s")


if __name__ == "__main__":
    main()
