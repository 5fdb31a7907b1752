#!/usr/bin/env python3
"""Generate the decoder (text-generation) parity fixtures for ferroformers.

Everything under tests/fixtures/decoders/ is rebuilt from scratch, offline and
deterministically: a byte-level BPE tokenizer is trained on scripts/corpus.txt,
tiny randomly initialised (seeded) GPT-2 / Llama / Qwen2 / BLOOM models are saved
with save_pretrained, and the reference outputs of the models, `generate` and
`pipeline("text-generation")` are written as JSON.

    HF_HUB_OFFLINE=1 /work/venv/bench/bin/python scripts/gen_fixtures_decoders.py [--only NAME[,NAME]]

`--only` rebuilds just those models (their folders and expected files) and updates their
entries in MANIFEST.json; the other fixtures stay as they are.

Layout:
    models/<name>/        save_pretrained output (config.json, generation_config.json,
                          model.safetensors, tokenizer.json, tokenizer_config.json)
    expected/<name>.json  see tests/fixtures/decoders/README.md (kept across runs)
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from tokenizers.processors import TemplateProcessing  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    BloomTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    pipeline,
)

transformers.logging.set_verbosity_error()
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "corpus.txt"
FIX = ROOT / "tests" / "fixtures" / "decoders"
MODELS = FIX / "models"
EXPECTED = FIX / "expected"

VOCAB = 500
INIT_RANGE = 0.3  # wide weights: peaky logits, so greedy choices are not near-ties

PROMPTS = [
    "Hello",
    "The quick brown fox",
    "My name is Sarah and I live in",
    "Café in Zürich is",
]
BATCH = ["Hello", "The quick brown fox jumps over", "I love"]

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Where is Paris?"},
    ],
]


def to_py(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def train_bpe(specials):
    t = ByteLevelBPETokenizer(add_prefix_space=False)
    t.train(
        [str(CORPUS)],
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=specials,
        show_progress=False,
    )
    return t


def gpt2_tokenizer(workdir):
    t = train_bpe(["<|endoftext|>"])
    path = workdir / "gpt2-tokenizer.json"
    t.save(str(path))
    return transformers.GPT2TokenizerFast(
        tokenizer_file=str(path),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=64,
    )


def bloom_tokenizer(workdir):
    """BLOOM's special tokens at its ids (<unk> 0, <s> 1, </s> 2, <pad> 3); no BOS added, and
    left padding as bigscience's tokenizer_config.json sets it."""
    t = train_bpe(["<unk>", "<s>", "</s>", "<pad>"])
    path = workdir / "bloom-tokenizer.json"
    t.save(str(path))
    return BloomTokenizerFast(
        tokenizer_file=str(path),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=64,
    )


def llama_tokenizer():
    t = train_bpe(["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"])
    bos = t.token_to_id("<s>")
    t.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=64,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHATML
    return tok


def seed(n):
    torch.manual_seed(n)


def build(name, cls, cfg, tok, gen_cfg=None):
    seed(sum(map(ord, name)))
    model = cls(cfg).eval()
    if gen_cfg is not None:
        model.generation_config = gen_cfg
    folder = MODELS / name
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder, save_jinja_files=False)
    return folder


def gen(model, tok, texts, **kw):
    """`generate` on `texts` (left-padded when several). Returns new tokens per returned row,
    cut after the first eos (HF fills finished rows with pad)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            return_dict_in_generate=True,
            output_scores=False,
            **kw,
        )
    seqs = out.sequences
    plen = enc["input_ids"].shape[1]
    eos = kw.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for r in seqs.tolist():
        new = r[plen:]
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        rows.append(new[:cut])
    case = {
        "inputs": texts,
        "params": kw,
        "input_ids": enc["input_ids"].tolist(),
        "attention_mask": enc["attention_mask"].tolist(),
        "new_tokens": rows,
    }
    if getattr(out, "sequences_scores", None) is not None:
        case["sequences_scores"] = out.sequences_scores.tolist()
    return case


def greedy_margin(model, tok, text, n):
    """Smallest gap between the two best logits over `n` greedy steps (near-ties would make
    greedy parity flaky)."""
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )
    gaps = []
    for lg in out.logits:
        top = torch.topk(lg[0], 2).values
        gaps.append(float(top[0] - top[1]))
    return min(gaps)


def expected_for(name, folder, chat=False, rope_note=None):
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    exp = {"model": name, "transformers": transformers.__version__}
    exp["tokenization"] = [
        {"text": t, "input_ids": tok(t)["input_ids"]} for t in PROMPTS + BATCH
    ]

    # Full logits of one short prompt.
    enc = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    exp["logits"] = {
        "text": PROMPTS[1],
        "input_ids": enc["input_ids"][0].tolist(),
        "logits": logits.tolist(),
    }

    # Per-step logits of greedy decoding with the KV cache.
    enc = tok(PROMPTS[2], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=5, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=tok.pad_token_id or 0,
        )
    exp["steps"] = {
        "text": PROMPTS[2],
        "input_ids": enc["input_ids"][0].tolist(),
        "tokens": out.sequences[0, enc["input_ids"].shape[1]:].tolist(),
        "logits": [lg[0].tolist() for lg in out.logits],
    }

    margins = {t: greedy_margin(model, tok, t, 20) for t in PROMPTS + BATCH}
    exp["greedy_margins"] = margins

    cases = []
    g = dict(do_sample=False)
    for t in PROMPTS:
        cases.append(dict(name=f"greedy {t!r}", **gen(model, tok, [t], max_new_tokens=10, **g)))
    base = gen(model, tok, [PROMPTS[1]], max_new_tokens=10, eos_token_id=None,
               pad_token_id=tok.pad_token_id or 0, **g)["new_tokens"][0]
    stop = base[3]
    cases.append(dict(name="eos stops", **gen(model, tok, [PROMPTS[1]], max_new_tokens=10,
                                              eos_token_id=stop, **g)))
    cases.append(dict(name="several eos", **gen(model, tok, [PROMPTS[1]], max_new_tokens=10,
                                                eos_token_id=[base[6], base[2]], **g)))
    cases.append(dict(name="min_new_tokens", **gen(model, tok, [PROMPTS[1]], max_new_tokens=10,
                                                   min_new_tokens=5, eos_token_id=base[1], **g)))
    cases.append(dict(name="max_length", **gen(model, tok, [PROMPTS[0]], max_length=9, **g)))
    cases.append(dict(name="repetition_penalty",
                      **gen(model, tok, [PROMPTS[2]], max_new_tokens=16, repetition_penalty=1.8, **g)))
    cases.append(dict(name="no_repeat_ngram_size",
                      **gen(model, tok, [PROMPTS[3]], max_new_tokens=20, no_repeat_ngram_size=2, **g)))
    cases.append(dict(name="beam 3",
                      **gen(model, tok, [PROMPTS[1]], max_new_tokens=8, num_beams=3, **g)))
    cases.append(dict(name="beam 3 return 2 lp 0.5 early",
                      **gen(model, tok, [PROMPTS[2]], max_new_tokens=8, num_beams=3,
                            num_return_sequences=2, length_penalty=0.5, early_stopping=True, **g)))
    cases.append(dict(name="beam 3 eos early_stopping never",
                      **gen(model, tok, [PROMPTS[1]], max_new_tokens=10, num_beams=3,
                            num_return_sequences=3, eos_token_id=[stop, base[5]],
                            early_stopping="never", length_penalty=1.5, **g)))
    cases.append(dict(name="beam 3 eos heuristic",
                      **gen(model, tok, [PROMPTS[1]], max_new_tokens=10, num_beams=3,
                            eos_token_id=[stop, base[5]], **g)))
    cases.append(dict(name="beam 4 eos early true",
                      **gen(model, tok, [PROMPTS[1]], max_new_tokens=10, num_beams=4,
                            num_return_sequences=2, eos_token_id=[stop, base[5]],
                            early_stopping=True, **g)))
    cases.append(dict(name="batched greedy", **gen(model, tok, BATCH, max_new_tokens=10, **g)))
    # Rows stop at different steps.
    b_ref = [gen(model, tok, [t], max_new_tokens=10, eos_token_id=None,
                 pad_token_id=tok.pad_token_id or 0, **g)["new_tokens"][0] for t in BATCH]
    cases.append(dict(name="batched eos", **gen(model, tok, BATCH, max_new_tokens=10,
                                                eos_token_id=[b_ref[0][2], b_ref[1][6]], **g)))
    cases.append(dict(name="batched beam",
                      **gen(model, tok, BATCH, max_new_tokens=6, num_beams=3,
                            num_return_sequences=2, **g)))
    cases.append(dict(name="batched repetition no_repeat",
                      **gen(model, tok, BATCH, max_new_tokens=12, repetition_penalty=1.3,
                            no_repeat_ngram_size=3, **g)))
    exp["generate"] = cases

    # The pipeline, greedy (its own default is sampling).
    pipe = pipeline("text-generation", model=str(folder), tokenizer=str(folder), device="cpu")
    pcases = []

    def run(inputs, **params):
        out = pipe(inputs, **params)
        pcases.append({"inputs": inputs, "params": params, "outputs": to_py(out)})

    run(PROMPTS[1], max_new_tokens=6, do_sample=False)
    run(PROMPTS[3], max_new_tokens=6, do_sample=False, return_full_text=False)
    run(PROMPTS[2], max_new_tokens=6, do_sample=False, prefix="Hello world. ")
    run(PROMPTS[0], max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    run([PROMPTS[0], PROMPTS[3]], max_new_tokens=4, do_sample=False)
    if chat:
        for c in CHATS:
            run(c, max_new_tokens=6, do_sample=False)
        run(CHATS[1], max_new_tokens=6, do_sample=False, return_full_text=False)
        # generation_config.json sets repetition_penalty=1.3 for this model (the pipeline's own
        # defaults, max_new_tokens=256 and sampling, still win over the model's).
        run(PROMPTS[1], do_sample=False, max_new_tokens=6)
    exp["pipelines"] = pcases
    write_json(EXPECTED / f"{name}.json", exp)
    return margins


def build_gpt2(work):
    gtok = gpt2_tokenizer(work)
    eos = gtok.eos_token_id
    gcfg = GPT2Config(
        vocab_size=len(gtok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
        initializer_range=INIT_RANGE, bos_token_id=eos, eos_token_id=eos,
    )
    folder = build("gpt2", GPT2LMHeadModel, gcfg, gtok)
    return expected_for("gpt2", folder)


def llama_common(ltok):
    return dict(
        vocab_size=len(ltok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        rope_theta=10000.0, initializer_range=INIT_RANGE, rms_norm_eps=1e-6,
        bos_token_id=ltok.bos_token_id, eos_token_id=ltok.eos_token_id,
        pad_token_id=ltok.pad_token_id,
    )


def build_llama(work):
    ltok = llama_tokenizer()
    lcfg = LlamaConfig(tie_word_embeddings=False, **llama_common(ltok))
    gen_cfg = GenerationConfig(
        bos_token_id=ltok.bos_token_id, eos_token_id=ltok.eos_token_id,
        pad_token_id=ltok.pad_token_id, repetition_penalty=1.3, max_new_tokens=7,
    )
    folder = build("llama", LlamaForCausalLM, lcfg, ltok, gen_cfg)
    return expected_for("llama", folder, chat=True)


def build_llama3_rope(work):
    ltok = llama_tokenizer()
    l3cfg = LlamaConfig(
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
        **llama_common(ltok),
    )
    folder = build("llama3-rope", LlamaForCausalLM, l3cfg, ltok)
    return expected_for("llama3-rope", folder)


def build_qwen2(work):
    ltok = llama_tokenizer()
    qcfg = Qwen2Config(
        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
        use_sliding_window=False, **llama_common(ltok),
    )
    folder = build("qwen2", Qwen2ForCausalLM, qcfg, ltok)
    return expected_for("qwen2", folder, chat=True)


def bloom_config(btok, **kw):
    return BloomConfig(
        vocab_size=len(btok), n_layer=2, initializer_range=INIT_RANGE,
        bos_token_id=btok.bos_token_id, eos_token_id=btok.eos_token_id,
        pad_token_id=btok.pad_token_id, **kw,
    )


def build_bloom(work):
    btok = bloom_tokenizer(work)
    cfg = bloom_config(btok, hidden_size=32, n_head=4)
    folder = build("bloom", BloomForCausalLM, cfg, btok)
    return expected_for("bloom", folder)


def build_bloom_6h(work):
    # 6 heads: ALiBi slopes for a head count that is not a power of two; also the residual
    # taken after the LayerNorms and an untied LM head.
    btok = bloom_tokenizer(work)
    cfg = bloom_config(
        btok, hidden_size=24, n_head=6, apply_residual_connection_post_layernorm=True,
        tie_word_embeddings=False,
    )
    folder = build("bloom-6h", BloomForCausalLM, cfg, btok)
    return expected_for("bloom-6h", folder)


BUILDERS = {
    "gpt2": build_gpt2,
    "llama": build_llama,
    "llama3-rope": build_llama3_rope,
    "qwen2": build_qwen2,
    "bloom": build_bloom,
    "bloom-6h": build_bloom_6h,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated fixture names to rebuild (default: all)")
    args = ap.parse_args()
    names = list(BUILDERS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown fixture(s) {unknown}; known: {', '.join(BUILDERS)}")

    margins = {}
    if args.only and (FIX / "MANIFEST.json").exists():
        margins = json.loads((FIX / "MANIFEST.json").read_text())["min_greedy_margin"]
    if args.only:
        for n in names:
            shutil.rmtree(MODELS / n, ignore_errors=True)
            (EXPECTED / f"{n}.json").unlink(missing_ok=True)
    else:
        for d in (MODELS, EXPECTED):
            if d.exists():
                shutil.rmtree(d)
    MODELS.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "ff-decoder-fixtures"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    report = {}
    for n in names:
        report[n] = BUILDERS[n](work)
        margins[n] = min(report[n].values())

    shutil.rmtree(work, ignore_errors=True)
    # Fixed order (BUILDERS'), whichever were rebuilt.
    margins = {k: margins[k] for k in BUILDERS if k in margins}
    write_json(FIX / "MANIFEST.json", {
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "tokenizers": tokenizers.__version__,
        "min_greedy_margin": margins,
    })
    for k, v in report.items():
        print(k, "min greedy logit gap", min(v.values()))


if __name__ == "__main__":
    main()
