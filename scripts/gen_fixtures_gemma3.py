#!/usr/bin/env python3
"""Generate the Gemma 3 decoder parity fixture (tests/fixtures/decoders/{models,expected}/gemma3),
with the helpers and reference cases of gen_fixtures_decoders.py (same tokenizer, prompts and
`generate`/pipeline cases), without touching the other decoders' fixtures.

    HF_HUB_OFFLINE=1 /work/venv/bench/bin/python scripts/gen_fixtures_gemma3.py

The model: Gemma3ForCausalLM, hidden 32, 3 layers (sliding, global, sliding; window 4 so the
prompts cross it), 4 heads / 2 KV heads of head_dim 16 (not hidden/heads), query_pre_attn_scalar
12 (not head_dim), global RoPE 1e6 with linear scaling 2, local RoPE 1e4, final logit soft cap
10, tanh GELU, tied embeddings; every RMSNorm weight random (HF initialises them to 0, which
would hide a missing `1 + weight`).
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_fixtures_decoders as d  # noqa: E402  (sets the offline environment and seeds)
import torch  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

NAME = "gemma3"


def main():
    for sub in (d.MODELS / NAME, d.EXPECTED / f"{NAME}.json"):
        if sub.is_dir():
            shutil.rmtree(sub)
        elif sub.exists():
            sub.unlink()
    tok = d.llama_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
        max_position_embeddings=64, rope_theta=1_000_000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=10_000.0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=10.0, hidden_activation="gelu_pytorch_tanh",
        initializer_range=d.INIT_RANGE, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    d.seed(sum(map(ord, NAME)))
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    folder = d.MODELS / NAME
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder, save_jinja_files=False)
    margins = d.expected_for(NAME, folder, chat=True)
    manifest_path = d.FIX / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["min_greedy_margin"][NAME] = min(margins.values())
    d.write_json(manifest_path, manifest)
    print(NAME, "min greedy logit gap", min(margins.values()))


if __name__ == "__main__":
    main()
