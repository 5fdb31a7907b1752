#!/usr/bin/env python3
"""Build one GGUF per weight type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
of the same Llama-shaped decoder, so that decoding speed can be compared type by type
(issue 13: "in the exact mode at least 2x transformers on every quant type").

Why a synthetic model: every real GGUF we have offline has a hidden size that is not a
multiple of 256 (SmolLM2 576, Qwen2.5-0.5B 896, Gemma 3 270M 640), so llama.cpp's quantizer
gives most of their matrices a fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
Q2_K/Q3_K -> IQ4_NL) and a K-quant file of them is mostly 32-value blocks. This model has
hidden size 1024, so every matrix takes the type asked for.

The model: Llama architecture, hidden 1024, 16 layers, 16 heads of 64 (4 key/value heads),
feed-forward 2816, vocabulary 49152 with SmolLM2-135M-Instruct's tokenizer (copied from its
GGUF, `scripts/fetch-models.sh smollm2`), tied embeddings; ~229M parameters. Weights are
random (seeded, normal, std 0.02; norms 1): the text it writes is gibberish, but every
engine does the same arithmetic per token as on a trained model of that shape.

Steps: write an F16 GGUF with gguf-py's GGUFWriter, then quantize it with llama.cpp's own
quantizer (llama-cpp-python's `llama_model_quantize`, `pure` so every matrix, the embedding
table included, takes the one type).

  /work/venv/bench/bin/python scripts/make_quant_ladder.py [--out DIR] [--types Q4_0,Q6_K,...]

Files go to DIR (default ~/.cache/ferroformers/quant-ladder/ladder-<TYPE>.gguf); existing
files are kept. Then, per type:
  /work/venv/bench/bin/python scripts/bench_generation.py --model ladder \
      --gguf DIR/ladder-Q3_K.gguf --engines ours,torch --runs single
"""
import argparse
import ctypes
import os
import sys
from pathlib import Path

import numpy as np

TYPES = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 1024, 16, 16, 4, 2816, 49152
HEAD = HIDDEN // HEADS


def smollm2_gguf():
    root = Path(os.environ.get("HF_HUB_CACHE")
                or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    repo = root / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    files = sorted(repo.glob("snapshots/*/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not files:
        sys.exit(f"SmolLM2's GGUF is not in {root}: run scripts/fetch-models.sh smollm2")
    return files[0]


def write_f16(path):
    import gguf

    src = gguf.GGUFReader(str(smollm2_gguf()))
    field = lambda k: src.fields[k].contents()  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ferroformers quant ladder (random weights)")
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(field("tokenizer.ggml.tokens"))
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
    w.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)

    rng = np.random.default_rng(13)
    mat = lambda rows, cols: (rng.standard_normal((rows, cols), dtype=np.float32)  # noqa: E731
                              * 0.02).astype(np.float16)
    ones = np.ones(HIDDEN, dtype=np.float32)
    w.add_tensor("token_embd.weight", mat(VOCAB, HIDDEN))
    w.add_tensor("output_norm.weight", ones)
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones)
        w.add_tensor(b + "attn_q.weight", mat(HIDDEN, HIDDEN))
        w.add_tensor(b + "attn_k.weight", mat(KV_HEADS * HEAD, HIDDEN))
        w.add_tensor(b + "attn_v.weight", mat(KV_HEADS * HEAD, HIDDEN))
        w.add_tensor(b + "attn_output.weight", mat(HIDDEN, HIDDEN))
        w.add_tensor(b + "ffn_norm.weight", ones)
        w.add_tensor(b + "ffn_gate.weight", mat(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", mat(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", mat(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src, dst, kind):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[kind])
    params.nthread = os.cpu_count() or 1
    params.pure = True
    params.allow_requantize = False
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed for {kind} (rc {rc})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path.home() / ".cache/ferroformers/quant-ladder"))
    ap.add_argument("--types", default=",".join(TYPES))
    a = ap.parse_args()
    kinds = [t.strip() for t in a.types.split(",") if t.strip()]
    for k in kinds:
        if k not in TYPES:
            sys.exit(f"unknown type {k!r}: one of {', '.join(TYPES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "ladder-F16.gguf"
    if not f16.exists():
        tmp = out / "ladder-F16.gguf.part"
        write_f16(tmp)
        tmp.rename(f16)
        print(f"wrote {f16}")
    for k in kinds:
        dst = out / f"ladder-{k}.gguf"
        if dst.exists():
            print(f"kept {dst}")
            continue
        tmp = out / f"ladder-{k}.gguf.part"
        quantize(f16, tmp, k)
        tmp.rename(dst)
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
