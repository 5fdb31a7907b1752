#!/usr/bin/env python3
"""The same calls through `transformers.pipeline` and `ferroformers.pipeline` on real models,
side by side, and the differences: structure (keys, nesting, lengths) must be identical, floats
within 1e-4, generated text the same.

  scripts/fetch-models.sh minilm smollm2
  pip install . transformers torch gguf     # ferroformers and the reference in one venv
  python3 scripts/compare_python.py [--threads 2]

Models: sentence-transformers/all-MiniLM-L6-v2 (feature-extraction: single texts, a list, a
generator) and SmolLM2-135M-Instruct Q4_1 GGUF (text-generation: a prompt, a list of prompts, a
chat; greedy). transformers loads the GGUF dequantized to f32, so ours runs `gguf_math="exact"`
(f32 activations: transformers' numbers). transformers' plain-prompt calls get
add_special_tokens=False: its GGUF loader adds a BOS token the file and the model's own
tokenizer do not (see below). Exit status 1 when anything differs.
"""
import argparse
import math
import os
import sys
from pathlib import Path

TOL = 1e-4
TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Hugging Face is a company based in New York City and Paris.",
    "Café in Zürich is naïve",
]
PROMPTS = ["The capital of France is", "Once upon a time, there was"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def hub_folder(repo_id):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, local_files_only=True)


def diff(ours, want, path="out", out=None):
    """Differences between two results, as strings (empty: the same)."""
    out = [] if out is None else out
    if isinstance(want, dict):
        if not isinstance(ours, dict) or sorted(ours) != sorted(want):
            out.append(f"{path}: keys {sorted(ours) if isinstance(ours, dict) else type(ours).__name__} vs {sorted(want)}")
        else:
            for k in want:
                diff(ours[k], want[k], f"{path}.{k}", out)
    elif isinstance(want, (list, tuple)):
        if not isinstance(ours, (list, tuple)) or len(ours) != len(want):
            n = len(ours) if isinstance(ours, (list, tuple)) else type(ours).__name__
            out.append(f"{path}: length {n} vs {len(want)}")
        else:
            for i, (a, b) in enumerate(zip(ours, want)):
                diff(a, b, f"{path}[{i}]", out)
    elif isinstance(want, float) or isinstance(ours, float):
        if not isinstance(ours, (int, float)) or not math.isclose(ours, want, rel_tol=0, abs_tol=TOL * max(1.0, abs(want))):
            out.append(f"{path}: {ours!r} vs {want!r}")
    elif ours != want:
        out.append(f"{path}: {ours!r} vs {want!r}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ferroformers

    torch.set_num_threads(args.threads)
    failures = 0

    def report(name, ours, want):
        nonlocal failures
        d = diff(ours, want)
        failures += bool(d)
        print(f"{'same' if not d else 'DIFFERENT'}  {name}")
        for line in d[:10]:
            print(f"    {line}")

    minilm = hub_folder("sentence-transformers/all-MiniLM-L6-v2")
    hf = transformers.pipeline("feature-extraction", model=minilm, device="cpu")
    ff = ferroformers.pipeline("feature-extraction", model=minilm)
    report("MiniLM feature-extraction, one text", ff(TEXTS[1]), hf(TEXTS[1]))
    report("MiniLM feature-extraction, a list", ff(TEXTS), hf(TEXTS))
    report("MiniLM feature-extraction, a generator", list(ff(t for t in TEXTS)), list(hf(t for t in TEXTS)))

    smol = hub_folder("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(smol, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(smol, gguf_file=gguf).eval()
    hf = transformers.pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    ff = ferroformers.pipeline("text-generation", model=str(Path(smol) / gguf), gguf_math="exact")
    kw = {"max_new_tokens": 20, "do_sample": False}
    # transformers' GGUF loader builds a Llama tokenizer that adds BOS (<|im_start|>) although
    # the file says `tokenizer.ggml.add_bos_token = false`; SmolLM2's own tokenizer (and
    # llama.cpp) add none, and so do we. Its plain-prompt calls get add_special_tokens=False to
    # tokenize as the model's tokenizer does (chats are templated and add nothing either way).
    plain = dict(kw, add_special_tokens=False)
    report("SmolLM2 text-generation, one prompt", ff(PROMPTS[0], **kw), hf(PROMPTS[0], **plain))
    report("SmolLM2 text-generation, a list", ff(PROMPTS, **kw), hf(PROMPTS, **plain))
    report("SmolLM2 text-generation, return_full_text=False", ff(PROMPTS[1], return_full_text=False, **kw),
           hf(PROMPTS[1], return_full_text=False, **plain))
    report("SmolLM2 text-generation, a chat", ff(CHAT, **kw), hf(CHAT, **kw))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, ferroformers {ferroformers.__version__}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
