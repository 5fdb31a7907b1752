#!/usr/bin/env python3
"""Generate the Python/transformers parity fixtures for ferroformers.

Everything under tests/fixtures/ (models/ and expected/) is rebuilt from
scratch, offline and deterministically: tiny tokenizers are trained on
scripts/corpus.txt, tiny randomly initialised (seeded) models are saved with
save_pretrained, and the reference outputs of the tokenizers, the raw models
and transformers.pipeline(...) are written as JSON.

How to run (from the repository root):

    python -m venv .venv
    .venv/bin/pip install -r scripts/requirements-fixtures.txt
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/gen_fixtures.py

No network access is needed (the Hugging Face hub is never contacted).
Two runs produce byte-identical files.

Layout of tests/fixtures:
    models/<name>/          save_pretrained output (config.json, weights, tokenizer files)
    models/corrupt/         BERT config.json + truncated model.safetensors
    models/no-config/       only a tokenizer.json
    expected/<name>.json    reference outputs (schema: see tests/fixtures/README.md)
    MANIFEST.json           library versions, model list, dropped pipeline cases
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import collections  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from tokenizers.normalizers import BertNormalizer  # noqa: E402
from tokenizers.pre_tokenizers import BertPreTokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    DistilBertTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    RobertaTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaForSequenceClassification,
    XLMRobertaTokenizerFast,
    pipeline,
)

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "corpus.txt"
FIX = ROOT / "tests" / "fixtures"
MODELS = FIX / "models"
EXPECTED = FIX / "expected"

MODEL_MAX_LENGTH = 48
VOCAB_SIZE = 500
HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
MAX_POS = 64
INIT_RANGE = 0.1

SEQCLS_LABELS = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
MULTILABEL_LABELS = {0: "TOXIC", 1: "SPAM", 2: "OFFTOPIC", 3: "URGENT"}
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

DROPPED = []  # (model, task, params, error)

# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Hugging Face is based in New York City.",
    "Café in Zürich is naïve",
    "I absolutely loved this movie! The acting was superb.",
    "My name is Sarah and I live in London.",
    "Emoji test: 🤗 is not in the vocabulary, ok?",
]

LONG_TEXT = (
    "John Smith, who works for Microsoft in Seattle, flew to Paris on Tuesday to meet "
    "Angela Merkel and Emmanuel Macron at the United Nations conference; afterwards he "
    "visited the café near the Eiffel Tower, bought 12 croissants for $45.99, took the "
    "train to Zürich, and wrote a long, rather naïve report about the European Central "
    "Bank, the World Health Organization and the future of machine learning in Europe."
)

PAIRS = [
    ("How old are you?", "I am 24 years old."),
    ("Where is the Eiffel Tower?", "It is in Paris, France."),
    ("The movie was great.", "I really enjoyed it!"),
]
LONG_PAIR = (LONG_TEXT, "Is this a short second sequence?")

QA_INPUTS = [
    {"question": "Where do I live?", "context": "My name is Wolfgang and I live in Berlin."},
    {"question": "What is the capital of France?", "context": "Paris is the capital and most populous city of France."},
    {"question": "Who founded SpaceX?", "context": "Elon Musk founded SpaceX in 2002 and later joined Tesla."},
]
QA_LONG = {"question": "Where did he fly?", "context": LONG_TEXT}


# Extra tokenizer-only inputs: normalization corner cases (full-width, ligature, NBSP,
# ellipsis, combining accent) and whitespace handling.
TOK_EXTRA = [
    "\uff28\uff45\uff4c\uff4c\uff4f \ufb01ne\u00a0world\u2026 Cafe\u0301",
    "  Leading and trailing spaces  ",
    "UPPERCASE WORDS AND MiXeD CaSe: NASA, IBM.",
]

# feature-extraction pipeline inputs (subset, to keep fixture size down)
FE_TEXTS = [TEXTS[0], TEXTS[3], TEXTS[6]]
# raw / batched_raw inputs for bare models (per-token hidden states are large)
BASE_RAW_TEXTS = [TEXTS[0], TEXTS[1], TEXTS[3], TEXTS[6]]


def mask_inputs(mask):
    return [
        f"The capital of France is {mask}.",
        f"Hugging Face is based in {mask} York City.",
        f"I {mask} this movie!",
        f"Café in {mask} is naïve",
    ]


def two_mask_input(mask):
    return f"The {mask} of France is {mask}."


def mlm_raw_inputs(mask):
    return [f"Hi {mask}!", f"Paris is {mask}."]


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def seed_all(name):
    seed = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def to_py(x):
    """Recursively convert numpy / torch values to plain Python (no rounding)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {str(k): to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_py(v) for v in x]
    return x


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        f.write("\n")


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------


def train_wordpiece_vocab(lowercase, vocab_size):
    """Deterministic WordPiece vocabulary (BPE-style merges, ties broken lexicographically).

    The `tokenizers` WordPiece trainer breaks ties via hash-map order and is
    therefore not reproducible across runs, so we build the vocab ourselves using
    the exact BERT normalizer / pre-tokenizer.
    """
    norm = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase)
    pre = BertPreTokenizer()
    counts = collections.Counter()
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            counts[w] += 1
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({s for syms in words.values() for s in syms if not s.startswith("##")})
    conts = sorted({s for syms in words.values() for s in syms if s.startswith("##")})
    vocab = specials + chars + conts
    seen = set(vocab)
    while len(vocab) < vocab_size:
        pairs = collections.Counter()
        for w, syms in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        new = a + b[2:]
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
        if new not in seen:
            seen.add(new)
            vocab.append(new)
    return vocab


def spm_normalization_rules():
    """A small NFKC-like rule set for SentencePiece.

    The stock nmt_nfkc charsmap adds ~600 KB per XLM-R folder; a custom rule TSV
    still produces a `Precompiled` normalizer in tokenizer.json (same code path)
    while staying a few KB.
    """
    rules = [(chr(c), chr(c - 0xFEE0)) for c in range(0xFF01, 0xFF5F)]  # full-width ASCII
    rules += [(s, " ") for s in ["\u00a0", "\u3000", "\u2002", "\u2003", "\u2009", "\u200a"]]
    rules += [
        ("\ufb01", "fi"),
        ("\ufb02", "fl"),
        ("\u2026", "..."),
        ("\u2018", "'"),
        ("\u2019", "'"),
        ("\u201c", '"'),
        ("\u201d", '"'),
        ("e\u0301", "\u00e9"),
        ("a\u0308", "\u00e4"),
        ("u\u0308", "\u00fc"),
        ("o\u0308", "\u00f6"),
        ("i\u0308", "\u00ef"),
        ("\u00bd", "1/2"),
        ("\u2122", "TM"),
    ]

    def cps(s):
        return " ".join("%04X" % ord(c) for c in s)

    return "".join(f"{cps(a)}\t{cps(b)}\n" for a, b in rules)


def build_tokenizers(workdir):
    toks = {}

    for key, lc in (("wordpiece-uncased", True), ("wordpiece-cased", False)):
        d = workdir / key
        d.mkdir()
        vocab = train_wordpiece_vocab(lc, VOCAB_SIZE)
        (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        toks[key] = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=lc, model_max_length=MODEL_MAX_LENGTH)
        toks[key + "-distil"] = DistilBertTokenizerFast(
            vocab_file=str(d / "vocab.txt"), do_lower_case=lc, model_max_length=MODEL_MAX_LENGTH
        )

    d = workdir / "bpe"
    d.mkdir()
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train(
        [str(CORPUS)],
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(d))
    toks["bpe"] = RobertaTokenizerFast(
        vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"), model_max_length=MODEL_MAX_LENGTH
    )

    # SentencePiece unigram, trained with the sentencepiece library so that the
    # XLM-R converter produces a genuine tokenizer.json (Precompiled normalizer,
    # Metaspace, fairseq id offset) plus the legacy sentencepiece.bpe.model.
    d = workdir / "unigram"
    d.mkdir()
    shutil.copy(CORPUS, d / "corpus.txt")
    (d / "rules.tsv").write_text(spm_normalization_rules(), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(d)  # relative paths only: they are stored inside the .model file
    try:
        spm.set_random_generator_seed(1234)
        spm.SentencePieceTrainer.train(
            input="corpus.txt",
            model_prefix="sentencepiece.bpe",
            vocab_size=VOCAB_SIZE,
            model_type="unigram",
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
            normalization_rule_tsv="rules.tsv",
        )
    finally:
        os.chdir(cwd)
    toks["unigram"] = XLMRobertaTokenizerFast(vocab_file=str(d / "sentencepiece.bpe.model"), model_max_length=MODEL_MAX_LENGTH)
    return toks


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def make_config(arch, tok, **kw):
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, initializer_range=INIT_RANGE)
    common.update(kw)
    if arch == "bert":
        return BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            type_vocab_size=2,
            **common,
        )
    if arch == "distilbert":
        return DistilBertConfig(
            dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE, max_position_embeddings=MAX_POS, **common
        )
    if arch in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
        return cls(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS + 2,
            type_vocab_size=1,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **common,
        )
    raise ValueError(arch)


MODEL_CLASSES = {
    ("bert", "seqcls"): BertForSequenceClassification,
    ("bert", "mlm"): BertForMaskedLM,
    ("bert", "tokcls"): BertForTokenClassification,
    ("bert", "qa"): BertForQuestionAnswering,
    ("bert", "base"): BertModel,
    ("distilbert", "seqcls"): DistilBertForSequenceClassification,
    ("distilbert", "mlm"): DistilBertForMaskedLM,
    ("distilbert", "tokcls"): DistilBertForTokenClassification,
    ("distilbert", "qa"): DistilBertForQuestionAnswering,
    ("distilbert", "base"): DistilBertModel,
    ("roberta", "seqcls"): RobertaForSequenceClassification,
    ("roberta", "mlm"): RobertaForMaskedLM,
    ("roberta", "tokcls"): RobertaForTokenClassification,
    ("roberta", "qa"): RobertaForQuestionAnswering,
    ("roberta", "base"): RobertaModel,
    ("xlm-roberta", "seqcls"): XLMRobertaForSequenceClassification,
    ("xlm-roberta", "mlm"): XLMRobertaForMaskedLM,
}


def perturb_(model):
    """Give LayerNorms and biases non-trivial values (HF init leaves them at 1/0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))


def build_model(name, arch, head, tok, **cfg_kw):
    seed_all(name)
    config = make_config(arch, tok, **cfg_kw)
    model = MODEL_CLASSES[(arch, head)](config)
    perturb_(model)
    model.eval()
    return model.float()


def head_kwargs(head, variant=None):
    if head == "seqcls":
        if variant == "multilabel":
            return dict(
                num_labels=4,
                id2label=MULTILABEL_LABELS,
                label2id={v: k for k, v in MULTILABEL_LABELS.items()},
                problem_type="multi_label_classification",
            )
        if variant == "regression":
            return dict(num_labels=1)
        return dict(num_labels=3, id2label=SEQCLS_LABELS, label2id={v: k for k, v in SEQCLS_LABELS.items()})
    if head == "tokcls":
        id2label = dict(enumerate(NER_LABELS))
        return dict(num_labels=len(NER_LABELS), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    return {}


# ----------------------------------------------------------------------------
# Expected outputs
# ----------------------------------------------------------------------------


def tokenization_entries(tok, items):
    out = []
    for text, pair in items:
        enc = tok(text, pair, truncation=True, return_offsets_mapping=True)
        out.append(
            {
                "text": text,
                "text_pair": pair,
                "input_ids": enc["input_ids"],
                "token_type_ids": enc.get("token_type_ids"),
                "attention_mask": enc["attention_mask"],
                "offsets": [list(o) for o in enc["offset_mapping"]],
                "tokens": tok.convert_ids_to_tokens(enc["input_ids"]),
            }
        )
    return out


def model_output_fields(head, out, row=0, length=None):
    sl = slice(0, length)
    if head == "qa":
        return {"start_logits": to_py(out.start_logits[row][sl]), "end_logits": to_py(out.end_logits[row][sl])}
    if head in ("base", "st"):
        return {"last_hidden_state": to_py(out.last_hidden_state[row][sl])}
    if head == "seqcls":
        return {"logits": to_py(out.logits[row])}
    return {"logits": to_py(out.logits[row][sl])}


def raw_entries(model, tok, head, items):
    res = []
    with torch.no_grad():
        for text, pair in items:
            enc = tok(text, pair, truncation=True, return_tensors="pt")
            out = model(**enc)
            e = {
                "text": text,
                "text_pair": pair,
                "input_ids": to_py(enc["input_ids"][0]),
                "token_type_ids": to_py(enc["token_type_ids"][0]) if "token_type_ids" in enc else None,
                "attention_mask": to_py(enc["attention_mask"][0]),
            }
            e.update(model_output_fields(head, out))
            res.append(e)
    return res


def batched_raw_entries(model, tok, head, items):
    """Singles are run as one padded batch, pairs as a second padded batch."""
    res = []
    singles = [t for t, p in items if p is None]
    pairs = [(t, p) for t, p in items if p is not None]
    groups = []
    if singles:
        groups.append((singles, None))
    if pairs:
        groups.append(([t for t, _ in pairs], [p for _, p in pairs]))
    with torch.no_grad():
        for texts, text_pairs in groups:
            enc = tok(texts, text_pairs, truncation=True, padding=True, return_tensors="pt")
            out = model(**enc)
            for i, text in enumerate(texts):
                n = int(enc["attention_mask"][i].sum())
                e = {
                    "text": text,
                    "text_pair": text_pairs[i] if text_pairs else None,
                    "input_ids": to_py(enc["input_ids"][i][:n]),
                    "token_type_ids": to_py(enc["token_type_ids"][i][:n]) if "token_type_ids" in enc else None,
                    "attention_mask": to_py(enc["attention_mask"][i][:n]),
                }
                e.update(model_output_fields(head, out, row=i, length=n))
                res.append(e)
    return res


def run_case(name, pipe, task, inputs, params=None, batch_size=None, call="single"):
    """call="single": outputs[i] = pipe(inputs[i], **params)
    call="list":   outputs = pipe(inputs, **params[, batch_size=batch_size])"""
    params = params or {}
    try:
        if call == "single":
            outputs = [pipe(x, **params) for x in inputs]
        else:
            kw = dict(params)
            if batch_size is not None:
                kw["batch_size"] = batch_size
            outputs = pipe(list(inputs), **kw)
            assert len(outputs) == len(inputs)
    except (Exception, BaseException) as e:  # noqa: BLE001  (pyo3 PanicException is a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        DROPPED.append({"model": name, "task": task, "params": params, "batch_size": batch_size, "error": repr(e)})
        print(f"  DROPPED {name} {task} {params} bs={batch_size}: {e!r}", file=sys.stderr)
        return None
    return {
        "task": task,
        "params": to_py(params),
        "batch_size": batch_size,
        "call": call,
        "inputs": to_py(inputs),
        "outputs": to_py(outputs),
    }


def seqcls_cases(name, folder):
    pipe = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    pair_inputs = [{"text": a, "text_pair": b} for a, b in PAIRS]
    cases = [
        run_case(name, pipe, "text-classification", TEXTS),
        run_case(name, pipe, "text-classification", TEXTS, {"top_k": 2}),
        run_case(name, pipe, "text-classification", TEXTS, {"top_k": None}),
        run_case(name, pipe, "text-classification", TEXTS, {"top_k": None, "function_to_apply": "softmax"}),
        run_case(name, pipe, "text-classification", TEXTS, {"top_k": None, "function_to_apply": "sigmoid"}),
        run_case(name, pipe, "text-classification", TEXTS, {"top_k": None, "function_to_apply": "none"}),
        run_case(name, pipe, "text-classification", TEXTS, {"function_to_apply": "sigmoid"}),
        run_case(name, pipe, "text-classification", pair_inputs),
        run_case(name, pipe, "text-classification", pair_inputs, {"top_k": None}),
        run_case(name, pipe, "text-classification", TEXTS, call="list"),
        run_case(name, pipe, "text-classification", TEXTS, batch_size=3, call="list"),
        run_case(name, pipe, "text-classification", TEXTS, {"top_k": None}, batch_size=3, call="list"),
        run_case(name, pipe, "text-classification", pair_inputs, batch_size=3, call="list"),
        run_case(name, pipe, "text-classification", [LONG_TEXT, "Hi"], {"truncation": True}),
        run_case(name, pipe, "text-classification", [LONG_TEXT, "Hi"], {"truncation": True}, batch_size=2, call="list"),
    ]
    return cases


def pick_targets(tok):
    vocab = tok.get_vocab()
    found = []
    for w in ["Paris", "London", "city", "is", "the", "in"]:
        for form in (w, w.lower(), "Ġ" + w, "Ġ" + w.lower(), "▁" + w, "▁" + w.lower()):
            if form in vocab and form not in found:
                found.append(form)
                break
        if len(found) == 2:
            break
    assert len(found) == 2, found
    return found


def fillmask_cases(name, folder, tok):
    pipe = pipeline("fill-mask", model=str(folder), tokenizer=str(folder), device="cpu")
    m = tok.mask_token
    inputs = mask_inputs(m)
    return [
        run_case(name, pipe, "fill-mask", inputs),
        run_case(name, pipe, "fill-mask", inputs, {"top_k": 2}),
        run_case(name, pipe, "fill-mask", inputs, {"targets": pick_targets(tok)}),
        run_case(name, pipe, "fill-mask", [two_mask_input(m)]),
        run_case(name, pipe, "fill-mask", [two_mask_input(m)], {"top_k": 2}),
        run_case(name, pipe, "fill-mask", inputs, batch_size=2, call="list"),
        run_case(name, pipe, "fill-mask", inputs + [two_mask_input(m)], {"top_k": 3}, batch_size=2, call="list"),
    ]


def tokcls_cases(name, folder):
    pipe = pipeline("token-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    inputs = TEXTS + [TOK_EXTRA[0], LONG_TEXT]
    cases = [run_case(name, pipe, "token-classification", inputs)]
    for agg in ("none", "simple", "first", "average", "max"):
        cases.append(run_case(name, pipe, "token-classification", inputs, {"aggregation_strategy": agg}))
    cases.append(run_case(name, pipe, "token-classification", inputs, {"aggregation_strategy": "none", "ignore_labels": []}))
    cases.append(run_case(name, pipe, "token-classification", inputs, {"aggregation_strategy": "simple"}, batch_size=2, call="list"))
    cases.append(
        run_case(name, pipe, "token-classification", [LONG_TEXT], {"aggregation_strategy": "simple", "stride": 8})
    )
    cases.append(
        run_case(name, pipe, "token-classification", [LONG_TEXT], {"aggregation_strategy": "first", "stride": 8})
    )
    return cases


def qa_cases(name, folder):
    pipe = pipeline("question-answering", model=str(folder), tokenizer=str(folder), device="cpu")
    return [
        run_case(name, pipe, "question-answering", QA_INPUTS),
        run_case(name, pipe, "question-answering", QA_INPUTS, {"top_k": 3}),
        run_case(name, pipe, "question-answering", QA_INPUTS, {"handle_impossible_answer": True}),
        run_case(name, pipe, "question-answering", QA_INPUTS, {"max_answer_len": 5}),
        run_case(name, pipe, "question-answering", [QA_LONG]),
        run_case(name, pipe, "question-answering", [QA_LONG], {"max_seq_len": 32, "doc_stride": 8}),
        run_case(name, pipe, "question-answering", [QA_LONG], {"max_seq_len": 32, "doc_stride": 8, "top_k": 3}),
        run_case(name, pipe, "question-answering", QA_INPUTS + [QA_LONG], batch_size=2, call="list"),
    ]


def sentence_embeddings(model, tok, texts, pooling, normalize):
    res = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, truncation=True, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            mask = enc["attention_mask"][0].to(h.dtype).unsqueeze(-1)
            if pooling == "mean":
                v = (h * mask).sum(0) / mask.sum(0).clamp(min=1e-9)
            elif pooling == "cls":
                v = h[0]
            elif pooling == "max":
                v = h.masked_fill(mask == 0, float("-inf")).max(0).values
            else:
                raise ValueError(pooling)
            if normalize:
                v = torch.nn.functional.normalize(v, p=2, dim=0)
            res.append(to_py(v))
    return res


def feature_cases(name, folder, model, tok, st=False):
    pipe = pipeline("feature-extraction", model=str(folder), tokenizer=str(folder), device="cpu")
    cases = [
        run_case(name, pipe, "feature-extraction", FE_TEXTS),
        run_case(name, pipe, "feature-extraction", FE_TEXTS, batch_size=2, call="list"),
        run_case(name, pipe, "feature-extraction", [LONG_TEXT], {"truncation": True}),
    ]
    emb_inputs = TEXTS + [LONG_TEXT]
    for pooling in ("mean", "cls", "max"):
        for normalize in (True, False):
            cases.append(
                {
                    "task": "sentence-embeddings",
                    "params": {"pooling": pooling, "normalize": normalize},
                    "batch_size": None,
                    "call": "single",
                    "inputs": emb_inputs,
                    "outputs": sentence_embeddings(model, tok, emb_inputs, pooling, normalize),
                }
            )
    if st:
        from sentence_transformers import SentenceTransformer

        stm = SentenceTransformer(str(folder), device="cpu")
        emb = stm.encode(emb_inputs, convert_to_numpy=True)
        cases.append(
            {
                "task": "sentence-embeddings",
                "params": {},
                "batch_size": None,
                "call": "list",
                "inputs": emb_inputs,
                "outputs": to_py(emb),
            }
        )
    return cases


FIXTURES_README = """\
# Parity fixtures (generated; do not edit)

Regenerate with `HF_HUB_OFFLINE=1 python scripts/gen_fixtures.py` using the pinned
environment in `scripts/requirements-fixtures.txt`. Output is deterministic.

## models/<name>/
`save_pretrained` folders of tiny random (seeded) float32 models: hidden 32, 2 layers,
4 heads, intermediate 64, vocab ~500, max_position_embeddings 64 (RoBERTa/XLM-R: 66),
tokenizer `model_max_length` 48.

- WordPiece uncased (`BertTokenizerFast`, do_lower_case + accent stripping): bert-*, bert-legacy, *-st;
  distilbert-* use the same vocab via `DistilBertTokenizerFast` (no token_type_ids).
- WordPiece cased: bert-cased-tokcls.
- Byte-level BPE (`RobertaTokenizerFast`): roberta-*, roberta-legacy.
- SentencePiece unigram (`XLMRobertaTokenizerFast`; tokenizer.json has a `Precompiled`
  normalizer built from a small custom NFKC-like rule set, plus sentencepiece.bpe.model): xlm-roberta-*.
- bert-legacy: config.json, vocab.txt, minimal tokenizer_config.json ({do_lower_case, model_max_length},
  no tokenizer_class), special_tokens_map.json, pytorch_model.bin (torch.save state dict)
  whose LayerNorm params are named `LayerNorm.gamma` / `LayerNorm.beta`. No tokenizer.json.
- roberta-legacy: config.json, vocab.json, merges.txt, minimal tokenizer_config.json ({model_max_length}),
  special_tokens_map.json, 2 safetensors shards + model.safetensors.index.json. No tokenizer.json.
- minilm-st (mean pooling + Normalize) / bert-st-cls (CLS pooling, no Normalize): sentence-transformers
  folders built from bert-base weights. `2_Normalize/` is listed in modules.json but the (empty)
  directory does not exist (git cannot track it; Hub repos look the same).
- corrupt/: BERT config.json + model.safetensors truncated to 200 bytes. no-config/: only tokenizer.json.

## expected/<name>.json
```
{
  "model": str,
  "tokenization": [{"text", "text_pair": str|null, "input_ids", "token_type_ids": [..]|null,
                    "attention_mask", "offsets": [[s,e],..], "tokens": [str,..]}],
      # tokenizer(text, text_pair, truncation=True, return_offsets_mapping=True) with the folder's
      # AutoTokenizer (fast). token_type_ids is null when the tokenizer does not return them.
  "raw": [{"text", "text_pair", "input_ids", "token_type_ids"|null, "attention_mask", <outputs>}],
      # one unpadded input at a time, truncation=True, eval, no grad. Batch dim removed:
      # seqcls: "logits" [num_labels]; tokcls: "logits" [seq][labels]; mlm: "logits" [seq][vocab];
      # qa: "start_logits" [seq], "end_logits" [seq]; bare/st: "last_hidden_state" [seq][hidden]
  "batched_raw": [same as raw],   # seqcls and *-base only: single texts run as ONE padded batch,
      # text pairs as a second padded batch; each row sliced back to its unpadded length
  "pipelines": [{"task", "params", "batch_size": int|null, "call": "single"|"list", "inputs", "outputs"}]
      # call == "single": outputs[i] = pipeline(inputs[i], **params)
      # call == "list":   outputs    = pipeline(inputs, **params, batch_size=batch_size)  (batch_size omitted if null)
      # task "sentence-embeddings" is not an HF pipeline: params {"pooling": mean|cls|max, "normalize": bool}
      # are computed in torch from last_hidden_state of each unpadded input (truncation=True);
      # params {} (st models only) = SentenceTransformer(folder).encode(inputs).
}
```
Floats are the exact float32/float64 values as Python `repr` (never rounded).
`MANIFEST.json` lists library versions, the models and any pipeline cases that raised (dropped).
"""

# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def save_model_folder(name, model, tok, **save_kw):
    folder = MODELS / name
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True, **save_kw)
    tok.save_pretrained(folder)
    return folder


def check_same(a, b, what):
    with torch.no_grad():
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), what
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (what, k)


def generate_expected(name, folder, head, task_set, extra_items=None):
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.is_fast, name
    if head in ("base", "st"):
        model = AutoModel.from_pretrained(str(folder))
    else:
        cls = {
            "seqcls": transformers.AutoModelForSequenceClassification,
            "mlm": transformers.AutoModelForMaskedLM,
            "tokcls": transformers.AutoModelForTokenClassification,
            "qa": transformers.AutoModelForQuestionAnswering,
        }[head]
        model = cls.from_pretrained(str(folder))
    model.eval()

    singles = [(t, None) for t in TEXTS + [LONG_TEXT]]
    pairs = list(PAIRS) + [LONG_PAIR]
    tok_items = singles + pairs + [(t, None) for t in TOK_EXTRA]
    if head == "mlm":
        tok_items = tok_items + [(t, None) for t in mask_inputs(tok.mask_token) + [two_mask_input(tok.mask_token)]]
        raw_items = [(t, None) for t in mlm_raw_inputs(tok.mask_token)]
    elif head == "qa":
        qa_items = [(q["question"], q["context"]) for q in QA_INPUTS + [QA_LONG]]
        tok_items = tok_items + qa_items
        raw_items = [(q["question"], q["context"]) for q in QA_INPUTS]
    elif head == "tokcls":
        raw_items = singles
    elif head == "base":
        raw_items = [(t, None) for t in BASE_RAW_TEXTS + [LONG_TEXT]] + list(PAIRS[:2])
    elif head == "st":  # same weights as bert-base: keep it small
        raw_items = [(TEXTS[0], None), (TEXTS[3], None)]
    else:  # seqcls
        raw_items = singles + list(PAIRS)

    exp = {
        "model": name,
        "tokenization": tokenization_entries(tok, tok_items),
        "raw": raw_entries(model, tok, head, raw_items),
    }
    if head in ("seqcls", "base"):
        exp["batched_raw"] = batched_raw_entries(model, tok, head, raw_items)

    if task_set == "seqcls":
        cases = seqcls_cases(name, folder)
    elif task_set == "mlm":
        cases = fillmask_cases(name, folder, tok)
    elif task_set == "tokcls":
        cases = tokcls_cases(name, folder)
    elif task_set == "qa":
        cases = qa_cases(name, folder)
    elif task_set in ("base", "st"):
        cases = feature_cases(name, folder, model, tok, st=(task_set == "st"))
    else:
        raise ValueError(task_set)
    exp["pipelines"] = [c for c in cases if c is not None]
    write_json(EXPECTED / f"{name}.json", exp)
    print(f"  {name}: {len(exp['pipelines'])} pipeline cases", file=sys.stderr)


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if MODELS.exists():
        shutil.rmtree(MODELS)
    MODELS.mkdir(parents=True)
    # expected/ also holds references written by other scripts (ref_minilm.py): keep those.
    keep = {"all-minilm-l6-v2.json"}
    EXPECTED.mkdir(parents=True, exist_ok=True)
    for f in EXPECTED.glob("*.json"):
        if f.name not in keep:
            f.unlink()
    for f in ("MANIFEST.json", "README.md"):
        if (FIX / f).exists():
            (FIX / f).unlink()

    work = Path(tempfile.mkdtemp(prefix="ferro-fixtures-"))
    try:
        toks = build_tokenizers(work)
        tok_for = {
            "bert": toks["wordpiece-uncased"],
            "bert-cased": toks["wordpiece-cased"],
            "distilbert": toks["wordpiece-uncased-distil"],
            "roberta": toks["bpe"],
            "xlm-roberta": toks["unigram"],
        }

        specs = [
            # name, arch, tokenizer key, head, variant
            ("bert-seqcls", "bert", "bert", "seqcls", None),
            ("bert-seqcls-multilabel", "bert", "bert", "seqcls", "multilabel"),
            ("bert-seqcls-regression", "bert", "bert", "seqcls", "regression"),
            ("bert-mlm", "bert", "bert", "mlm", None),
            ("bert-tokcls", "bert", "bert", "tokcls", None),
            ("bert-cased-tokcls", "bert", "bert-cased", "tokcls", None),
            ("bert-qa", "bert", "bert", "qa", None),
            ("bert-base", "bert", "bert", "base", None),
            ("distilbert-seqcls", "distilbert", "distilbert", "seqcls", None),
            ("distilbert-mlm", "distilbert", "distilbert", "mlm", None),
            ("distilbert-tokcls", "distilbert", "distilbert", "tokcls", None),
            ("distilbert-qa", "distilbert", "distilbert", "qa", None),
            ("distilbert-base", "distilbert", "distilbert", "base", None),
            ("roberta-seqcls", "roberta", "roberta", "seqcls", None),
            ("roberta-mlm", "roberta", "roberta", "mlm", None),
            ("roberta-tokcls", "roberta", "roberta", "tokcls", None),
            ("roberta-qa", "roberta", "roberta", "qa", None),
            ("roberta-base", "roberta", "roberta", "base", None),
            ("xlm-roberta-seqcls", "xlm-roberta", "xlm-roberta", "seqcls", None),
            ("xlm-roberta-mlm", "xlm-roberta", "xlm-roberta", "mlm", None),
        ]
        names = []
        for name, arch, tkey, head, variant in specs:
            print(f"building {name}", file=sys.stderr)
            tok = tok_for[tkey]
            model = build_model(name, arch, head, tok, **head_kwargs(head, variant))
            save_model_folder(name, model, tok)
            generate_expected(name, MODELS / name, head, head)
            names.append(name)

        # --- bert-legacy: vocab.txt only, pytorch_model.bin with gamma/beta LayerNorm names
        name = "bert-legacy"
        print(f"building {name}", file=sys.stderr)
        tok = toks["wordpiece-uncased"]
        model = build_model(name, "bert", "mlm", tok)
        folder = MODELS / name
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        sd = {}
        for k, v in model.state_dict().items():
            k2 = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            sd[k2] = v.detach().clone().contiguous()
        assert any(k.endswith("LayerNorm.gamma") for k in sd)
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "vocab.txt").write_text((work / "wordpiece-uncased" / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
        write_json_pretty(folder / "tokenizer_config.json", {"do_lower_case": True, "model_max_length": MODEL_MAX_LENGTH})
        write_json_pretty(
            folder / "special_tokens_map.json",
            {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"},
        )
        reloaded = BertForMaskedLM.from_pretrained(str(folder))
        check_same(model, reloaded, name)
        check_same_tokenizer(AutoTokenizer.from_pretrained(str(folder)), tok, name)
        generate_expected(name, folder, "mlm", "mlm")
        names.append(name)

        # --- roberta-legacy: vocab.json + merges.txt only, sharded safetensors
        name = "roberta-legacy"
        print(f"building {name}", file=sys.stderr)
        tok = toks["bpe"]
        model = build_model(name, "roberta", "seqcls", tok, **head_kwargs("seqcls"))
        folder = MODELS / name
        folder.mkdir(parents=True)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("model-*.safetensors"))) >= 2
        tok.save_pretrained(folder, legacy_format=True)
        for f in folder.iterdir():
            if f.name in ("tokenizer.json", "added_tokens.json"):
                f.unlink()
        write_json_pretty(folder / "tokenizer_config.json", {"model_max_length": MODEL_MAX_LENGTH})
        write_json_pretty(
            folder / "special_tokens_map.json",
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "sep_token": "</s>",
                "pad_token": "<pad>",
                "cls_token": "<s>",
                "mask_token": {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False},
            },
        )
        check_same(model, RobertaForSequenceClassification.from_pretrained(str(folder)), name)
        check_same_tokenizer(AutoTokenizer.from_pretrained(str(folder)), tok, name)
        generate_expected(name, folder, "seqcls", "seqcls")
        names.append(name)

        # --- sentence-transformers folders built from bert-base
        from sentence_transformers import SentenceTransformer
        from sentence_transformers import models as st_models

        for name, pooling, normalize in (("minilm-st", "mean", True), ("bert-st-cls", "cls", False)):
            print(f"building {name}", file=sys.stderr)
            seed_all(name)
            tr = st_models.Transformer(str(MODELS / "bert-base"), max_seq_length=MODEL_MAX_LENGTH)
            mods = [tr, st_models.Pooling(tr.get_word_embedding_dimension(), pooling_mode=pooling)]
            if normalize:
                mods.append(st_models.Normalize())
            stm = SentenceTransformer(modules=mods, device="cpu")
            folder = MODELS / name
            stm.save(str(folder), create_model_card=False, safe_serialization=True)
            for f in ("README.md",):
                if (folder / f).exists():
                    (folder / f).unlink()
            # git cannot track the empty 2_Normalize/ directory (hub repos lack it too):
            # remove it so the fixture matches what a checkout contains.
            if (folder / "2_Normalize").is_dir() and not any((folder / "2_Normalize").iterdir()):
                (folder / "2_Normalize").rmdir()
            pcfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
            assert pcfg[f"pooling_mode_{'mean_tokens' if pooling == 'mean' else 'cls_token'}"] is True, pcfg
            generate_expected(name, folder, "st", "st")
            names.append(name)

        # --- error fixtures
        corrupt = MODELS / "corrupt"
        corrupt.mkdir()
        shutil.copy(MODELS / "bert-seqcls" / "config.json", corrupt / "config.json")
        real = (MODELS / "bert-seqcls" / "model.safetensors").read_bytes()
        (corrupt / "model.safetensors").write_bytes(real[:200])
        noconf = MODELS / "no-config"
        noconf.mkdir()
        shutil.copy(MODELS / "bert-base" / "tokenizer.json", noconf / "tokenizer.json")

        manifest = {
            "generator": "scripts/gen_fixtures.py",
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "sentencepiece": spm.__version__,
                "sentence_transformers": __import__("sentence_transformers").__version__,
                "numpy": np.__version__,
            },
            "model_max_length": MODEL_MAX_LENGTH,
            "models": names,
            "error_fixtures": ["corrupt", "no-config"],
            "dropped_cases": DROPPED,
        }
        write_json_pretty(FIX / "MANIFEST.json", manifest)
        (FIX / "README.md").write_text(FIXTURES_README, encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"done: {len(names)} models, {len(DROPPED)} dropped cases", file=sys.stderr)


def write_json_pretty(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def check_same_tokenizer(a, b, what):
    items = [(t, None) for t in TEXTS + [LONG_TEXT]] + list(PAIRS) + [LONG_PAIR]
    for text, pair in items:
        ea = a(text, pair, truncation=True, return_offsets_mapping=True)
        eb = b(text, pair, truncation=True, return_offsets_mapping=True)
        assert dict(ea) == dict(eb), (what, text)
    assert a.mask_token == b.mask_token and a.model_max_length == b.model_max_length, what


if __name__ == "__main__":
    main()
