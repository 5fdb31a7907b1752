#!/usr/bin/env python3
"""Generate the encoder-decoder (seq2seq) and zero-shot parity fixtures for ferroformers.

Everything under tests/fixtures/seq2seq/ is rebuilt from scratch, offline and
deterministically: SentencePiece unigram tokenizers are trained on scripts/corpus.txt
(T5 `spiece.model`, Marian `source.spm` / `target.spm`), the byte-level BPE and WordPiece
tokenizers are reused from tests/fixtures/models/{roberta-base,bert-seqcls}, tiny randomly
initialised (seeded) T5 / BART / Marian / NLI classifier models are saved with
save_pretrained (float32), and the reference outputs of the tokenizers, the raw models,
`generate` and `transformers.pipeline(...)` are written as JSON.

    HF_HUB_OFFLINE=1 /work/venv/py/bin/python scripts/gen_fixtures_seq2seq.py

(run scripts/gen_fixtures.py first: tokenizer files are copied from tests/fixtures/models/).
No network access is needed. Two runs produce byte-identical files.

Layout of tests/fixtures/seq2seq:
    models/<name>/          save_pretrained output
    expected/<name>.json    reference outputs (schema: see tests/fixtures/seq2seq/README.md)
    MANIFEST.json           library versions, model list, greedy margins, dropped cases
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import json  # noqa: E402
import logging  # noqa: E402
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
from transformers import (  # noqa: E402
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BartTokenizerFast,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    MarianTokenizer,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
    T5TokenizerFast,
    pipeline,
)

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "scripts" / "corpus.txt"
ENCODER_MODELS = ROOT / "tests" / "fixtures" / "models"
FIX = ROOT / "tests" / "fixtures" / "seq2seq"
MODELS = FIX / "models"
EXPECTED = FIX / "expected"

MODEL_MAX_LENGTH = 48
D_MODEL = 32
LAYERS = 2
HEADS = 4
FFN = 64
MAX_POS = 64
T5_EXTRA_IDS = 8
T5_SPM_VOCAB = 500 - T5_EXTRA_IDS  # 492 pieces + 8 <extra_id_N> = 500
MARIAN_SRC_VOCAB = 400
MARIAN_TGT_VOCAB = 300
INIT_STD = 0.3  # NLI classifiers
GEN_INIT_STD = 1.0  # BART / Marian: wide weights give peakier, more input-dependent logits
SEED_CANDIDATES = 40  # generative models: best of this many seeds (see pick_seed)

NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
NLI_LABELS_UPPER = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
NO_ENTAIL_LABELS = {0: "LABEL_0", 1: "LABEL_1"}

T5_TASK_PARAMS = {
    "summarization": {
        "prefix": "summarize: ",
        "min_length": 3,
        "max_length": 20,
        "early_stopping": True,
        "num_beams": 2,
        "length_penalty": 2.0,
        "no_repeat_ngram_size": 3,
    },
    "translation_en_to_de": {
        "prefix": "translate English to German: ",
        "max_length": 20,
        "early_stopping": True,
        "num_beams": 2,
    },
}
BART_TASK_PARAMS = {
    "summarization": {
        "min_length": 3,
        "max_length": 20,
        "num_beams": 2,
        "no_repeat_ngram_size": 3,
        "length_penalty": 2.0,
        "early_stopping": True,
    }
}

DROPPED = []  # (model, task, params, error)
SEEDS = {}  # generative model -> chosen seed

# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Café in Zürich is naïve",
    "UPPERCASE WORDS: NASA and IBM.",
    "I bought 12 croissants for $45.99 in 2024.",
    "My name is Sarah and I live in London.",
]
# Extra tokenizer-only inputs (normalisation / whitespace corner cases).
TOK_EXTRA = [
    "\uff28\uff45\uff4c\uff4c\uff4f \ufb01ne\u00a0world\u2026 Cafe\u0301",
    "  Leading and   trailing spaces  ",
]
T5_SENTINEL_TEXT = "The <extra_id_0> walks in <extra_id_1> park."
TARGET_TEXTS = [
    "Ich heiße Sarah und wohne in London.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Grüße aus Zürich, 12 Croissants für 45,99 €.",
]

RAW_TEXTS = [TEXTS[1], TEXTS[2]]
GEN_TEXTS = [TEXTS[5], TEXTS[1]]  # the first is the main prompt; both form the padded batch
SUM_TEXT = "John Smith flew to Paris on Tuesday to meet Angela Merkel at the conference."  # <= 48 tokens everywhere

ZS_SEQUENCES = [
    "Angela Merkel is a politician in Germany and leader of the CDU.",
    "The football match ended two to one after extra time.",
    "Hi",
]
ZS_LABELS = ["politics", "sports", "science"]

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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        f.write("\n")


def write_json_pretty(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------


def spm_normalization_rules():
    """Same small NFKC-like rule set as scripts/gen_fixtures.py (the stock nmt_nfkc charsmap
    would add ~250 KB per model file); still yields a `Precompiled` normalizer."""
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


def train_spm(workdir, prefix, corpus_text, vocab_size, **kw):
    d = workdir / prefix
    d.mkdir()
    (d / "corpus.txt").write_text(corpus_text, encoding="utf-8")
    (d / "rules.tsv").write_text(spm_normalization_rules(), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(d)  # relative paths only: they are stored inside the .model file
    try:
        spm.set_random_generator_seed(1234)
        spm.SentencePieceTrainer.train(
            input="corpus.txt",
            model_prefix="m",
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
            normalization_rule_tsv="rules.tsv",
            **kw,
        )
    finally:
        os.chdir(cwd)
    return d / "m.model"


def german_corpus():
    """A small pseudo-German target corpus (the target.spm must differ from source.spm)."""
    base = TARGET_TEXTS + [
        "Der Hund schläft im Garten, und die Katze spielt mit dem Ball.",
        "Wir fahren morgen mit dem Zug nach Berlin und München.",
        "Das Wetter ist heute schön, aber morgen wird es regnen.",
        "Die Europäische Zentralbank hat ihren Sitz in Frankfurt am Main.",
        "Ich habe zwölf Brötchen und drei Äpfel gekauft.",
        "Maschinelles Lernen verändert die Welt der Übersetzung.",
        "Wo ist der Eiffelturm? Er ist in Paris, Frankreich.",
        "Wie alt bist du? Ich bin 24 Jahre alt.",
        "Der Film war großartig, die Schauspieler waren hervorragend.",
        "Guten Morgen, guten Abend und gute Nacht!",
    ]
    # Mix in the English corpus so shared pieces exist (names, numbers, punctuation).
    return "\n".join(base * 3) + "\n" + CORPUS.read_text(encoding="utf-8")


def build_tokenizers(workdir):
    toks = {}
    corpus = CORPUS.read_text(encoding="utf-8")

    # T5: pad=0, eos=1, unk=2, no bos; <extra_id_N> appended after the spm pieces.
    t5_model = train_spm(workdir, "t5", corpus, T5_SPM_VOCAB, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    d = workdir / "t5-tok"
    d.mkdir()
    shutil.copy(t5_model, d / "spiece.model")
    # add_prefix_space=True explicitly: left unset, T5TokenizerFast hands add_prefix_space=None to
    # the slow->fast converter, which then emits Metaspace(prepend_scheme="never") (no "▁" before
    # the first word, unlike real t5-small's tokenizer.json and the slow tokenizer).
    toks["t5"] = T5TokenizerFast(
        vocab_file=str(d / "spiece.model"), extra_ids=T5_EXTRA_IDS, model_max_length=MODEL_MAX_LENGTH,
        add_prefix_space=True,
    )
    toks["t5-slow"] = T5Tokenizer(
        vocab_file=str(d / "spiece.model"), extra_ids=T5_EXTRA_IDS, model_max_length=MODEL_MAX_LENGTH
    )

    # Marian: two spm models (default <unk>=0, <s>=1, </s>=2) whose pieces are mapped to ids
    # through a joint vocab.json: "</s>"=0, "<unk>"=1, pieces..., "<pad>"=last (opus-mt layout).
    src = train_spm(workdir, "marian-src", corpus, MARIAN_SRC_VOCAB)
    tgt = train_spm(workdir, "marian-tgt", german_corpus(), MARIAN_TGT_VOCAB)
    vocab = {"</s>": 0, "<unk>": 1}
    for m in (src, tgt):
        sp = spm.SentencePieceProcessor(model_file=str(m))
        for i in range(sp.get_piece_size()):
            p = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or p in vocab:
                continue
            vocab[p] = len(vocab)
    vocab["<pad>"] = len(vocab)
    d = workdir / "marian-tok"
    d.mkdir()
    shutil.copy(src, d / "source.spm")
    shutil.copy(tgt, d / "target.spm")
    write_json_pretty(d / "vocab.json", vocab)
    toks["marian"] = MarianTokenizer(
        source_spm=str(d / "source.spm"),
        target_spm=str(d / "target.spm"),
        vocab=str(d / "vocab.json"),
        source_lang="en",
        target_lang="de",
        model_max_length=MODEL_MAX_LENGTH,
    )

    rb = ENCODER_MODELS / "roberta-base"
    toks["bart"] = BartTokenizerFast(
        vocab_file=str(rb / "vocab.json"), merges_file=str(rb / "merges.txt"), model_max_length=MODEL_MAX_LENGTH
    )
    toks["roberta"] = RobertaTokenizerFast.from_pretrained(str(rb))
    toks["bert"] = BertTokenizerFast.from_pretrained(str(ENCODER_MODELS / "bert-seqcls"))
    return toks


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def perturb_(model):
    """Give (RMS)LayerNorms, biases and final_logits_bias non-trivial values (HF init leaves
    them at 1/0), so loaders that skip tensors fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name and not p.requires_grad:  # Marian: sinusoidal, not saved
                continue
            if any(s in name for s in ("LayerNorm", "layer_norm", "layernorm")):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.copy_(0.1 * torch.randn_like(b))


def t5_config(tok, gated):
    return T5Config(
        vocab_size=len(tok),
        d_model=D_MODEL,
        d_kv=D_MODEL // HEADS,
        d_ff=FFN,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        initializer_factor=1.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        n_positions=MAX_POS,
        task_specific_params=json.loads(json.dumps(T5_TASK_PARAMS)),
    )


def bart_config(tok, init_std=GEN_INIT_STD, **kw):
    return BartConfig(
        vocab_size=len(tok),
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=MAX_POS,
        activation_function="gelu",
        scale_embedding=False,
        init_std=init_std,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_bos_token_id=tok.bos_token_id,
        forced_eos_token_id=tok.eos_token_id,
        **kw,
    )


def marian_config(tok):
    pad = tok.pad_token_id
    return MarianConfig(
        vocab_size=len(tok),
        decoder_vocab_size=len(tok),
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=MAX_POS,
        activation_function="swish",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        init_std=GEN_INIT_STD,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=pad,
        forced_eos_token_id=tok.eos_token_id,
    )


def decorrelate_(model):
    """Random-sign weights for the last norm before the (tied) LM head.

    With tied embeddings the decoder's residual stream still carries the embedding of the
    previous token, so h . E^T peaks at that token and a random model repeats one token
    forever. N(0, scale^2) norm weights (random signs) break that self-loop, so generated
    sequences vary and depend on the encoder input.
    """
    scale = 1.0
    if isinstance(model, T5ForConditionalGeneration):
        w = model.decoder.final_layer_norm.weight
        scale = 4.0  # T5's logits are small (RMS-normed h, d_model**-0.5 rescale when tied)
    elif isinstance(model, (BartForConditionalGeneration, MarianMTModel)):
        w = model.model.decoder.layers[-1].final_layer_norm.weight
    else:
        return
    with torch.no_grad():
        w.copy_(scale * torch.randn_like(w))


def seqcls_kw(labels):
    return dict(num_labels=len(labels), id2label=dict(labels), label2id={v: k for k, v in labels.items()})


def build(name, cls, config, generation_config=None, seed_name=None):
    seed_all(seed_name or name)
    model = cls(config)
    perturb_(model)
    decorrelate_(model)
    if generation_config is not None:
        model.generation_config = generation_config
    model.eval()
    return model.float()


def probe(model, tok):
    """Greedy decoding (12 steps, eos disabled) of the probe texts: sequences and the smallest
    gap between the two best processed scores (near-ties would make parity flaky)."""
    seqs, margins = [], []
    for t in GEN_TEXTS + [SUM_TEXT, TEXTS[0]]:
        m, seq = greedy_margin(model, tok, t, 12)
        seqs.append(seq[1:])
        margins.append(m)
    return seqs, min(margins)


def pick_seed(name, cls, config, tok, generation_config=None):
    """Random tiny decoders tend to fall into a one-token loop that ignores the input. Try
    SEED_CANDIDATES seeds (deterministic) and keep the one whose greedy outputs are most varied
    and input-dependent, with no near-tie (margin >= 0.05)."""
    best = None
    for k in range(SEED_CANDIDATES):
        seed_name = f"{name}#{k}"
        model = build(name, cls, config, generation_config, seed_name=seed_name)
        seqs, margin = probe(model, tok)
        distinct = sorted(len(set(s)) for s in seqs)
        score = (margin >= 0.05, len({tuple(s) for s in seqs}), distinct[0] + distinct[1], sum(distinct), margin)
        if best is None or score > best[0]:
            best = (score, seed_name, margin)
    print(f"  {name}: seed {best[1]!r} score {best[0]}", file=sys.stderr)
    SEEDS[name] = {"seed_name": best[1], "probe_min_margin": best[2]}
    return build(name, cls, config, generation_config, seed_name=best[1])


def save_folder(name, model, tok):
    folder = MODELS / name
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def check_same(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (what, k)


# ----------------------------------------------------------------------------
# Expected outputs
# ----------------------------------------------------------------------------


def tokenization_entries(tok, texts, slow=None, targets=()):
    out = []
    for t in texts:
        enc = tok(t)
        e = {
            "text": t,
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "tokens": tok.convert_ids_to_tokens(enc["input_ids"]),
            "decoded": tok.decode(enc["input_ids"], skip_special_tokens=True),
        }
        if slow is not None:
            e["input_ids_slow"] = slow(t)["input_ids"]
            assert e["input_ids_slow"] == e["input_ids"], ("slow != fast", t, e["input_ids_slow"], e["input_ids"])
        out.append(e)
    for t in targets:
        enc = tok(text_target=t)
        out.append(
            {
                "text_target": t,
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "tokens": tok.convert_ids_to_tokens(enc["input_ids"]),
                "decoded": tok.decode(enc["input_ids"], skip_special_tokens=True),
            }
        )
    return out


def decoder_ids_for(model, tok, text):
    start = model.config.decoder_start_token_id
    ids = tok(text, add_special_tokens=False)["input_ids"][:2]
    return [start] + ids


def raw_seq2seq(model, tok, texts):
    res = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            dec = decoder_ids_for(model, tok, t)
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                decoder_input_ids=torch.tensor([dec]),
            )
            res.append(
                {
                    "text": t,
                    "input_ids": to_py(enc["input_ids"][0]),
                    "attention_mask": to_py(enc["attention_mask"][0]),
                    "decoder_input_ids": dec,
                    "encoder_last_hidden_state": to_py(out.encoder_last_hidden_state[0]),
                    "logits": to_py(out.logits[0]),
                }
            )
    return res


def raw_seqcls(model, tok, pairs):
    res = []
    with torch.no_grad():
        for a, b in pairs:
            enc = tok(a, b, return_tensors="pt")
            out = model(**enc)
            res.append(
                {
                    "text": a,
                    "text_pair": b,
                    "input_ids": to_py(enc["input_ids"][0]),
                    "token_type_ids": to_py(enc["token_type_ids"][0]) if "token_type_ids" in enc else None,
                    "attention_mask": to_py(enc["attention_mask"][0]),
                    "logits": to_py(out.logits[0]),
                }
            )
    return res


def generate_case(model, tok, inputs, **params):
    """model.generate on one string or a padded batch of strings (tokenizer default padding side)."""
    enc = tok(inputs if isinstance(inputs, list) else [inputs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, return_dict_in_generate=True, **params)
    case = {
        "input": inputs,
        "params": dict(params),
        "input_ids": to_py(enc["input_ids"]),
        "attention_mask": to_py(enc["attention_mask"]),
        "output_ids": to_py(out.sequences),
        "output_text": tok.batch_decode(out.sequences, skip_special_tokens=True),
    }
    if getattr(out, "sequences_scores", None) is not None:
        case["sequences_scores"] = to_py(out.sequences_scores)
    return case


def strip_pad(row, pad):
    row = list(row)
    # keep the leading decoder start (which may equal pad), drop trailing pad fill
    while len(row) > 1 and row[-1] == pad:
        row.pop()
    return row


def greedy_margin(model, tok, text, n):
    """Smallest gap between the two best (processed) scores over `n` greedy steps without eos."""
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, num_beams=1, output_scores=True,
            return_dict_in_generate=True, eos_token_id=None, forced_eos_token_id=None, min_length=0,
        )
    gaps = []
    for s in out.scores:
        top = torch.topk(s[0], 2).values
        gap = float(top[0] - top[1])
        if gap != float("inf"):  # forced tokens (forced_bos) leave a single finite score
            gaps.append(gap)
    return min(gaps), to_py(out.sequences[0])


def generate_cases(model, tok):
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    main, second = GEN_TEXTS
    g = dict(do_sample=False)
    cases = []

    def add(label, inputs, **params):
        c = generate_case(model, tok, inputs, **params)
        cases.append(dict(name=label, **c))
        return c

    greedy = add("greedy", main, max_new_tokens=8, num_beams=1, **g)
    add("greedy second", second, max_new_tokens=8, num_beams=1, **g)
    # A token the unconstrained greedy run produces at step 3 is declared eos: without
    # min_length decoding stops there; min_length=7 (counts the decoder start) forbids it.
    free = generate_case(model, tok, main, max_new_tokens=10, num_beams=1, eos_token_id=None,
                         forced_eos_token_id=None, **g)["output_ids"][0]
    stop = free[3]
    add("eos stops", main, max_new_tokens=10, num_beams=1, eos_token_id=stop, **g)
    add("min_length", main, max_new_tokens=10, num_beams=1, eos_token_id=stop, min_length=7, **g)
    add("min_new_tokens", main, max_new_tokens=10, num_beams=1, eos_token_id=stop, min_new_tokens=5, **g)
    add("max_length", main, max_length=6, num_beams=1, **g)
    add("beam 3", main, max_new_tokens=8, num_beams=3, **g)
    add("beam 3 return 2 lp 2.0 early no_repeat 2", main, max_new_tokens=8, num_beams=3,
        num_return_sequences=2, length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=2, **g)
    add("beam 3 eos", main, max_new_tokens=10, num_beams=3, num_return_sequences=3,
        eos_token_id=[eos, stop], length_penalty=1.0, early_stopping=False, **g)
    add("repetition_penalty 1.3", main, max_new_tokens=12, num_beams=1, repetition_penalty=1.3, **g)
    add("no_repeat_ngram_size 2", main, max_new_tokens=12, num_beams=1, no_repeat_ngram_size=2, **g)

    # Batched (padded) inputs of different lengths must equal one-by-one runs.
    for label, params in (
        ("batch greedy", dict(max_new_tokens=8, num_beams=1, **g)),
        ("batch beam 3", dict(max_new_tokens=8, num_beams=3, **g)),
        ("batch greedy eos", dict(max_new_tokens=10, num_beams=1, eos_token_id=stop, **g)),
    ):
        c = add(label, [main, second], **params)
        singles = [generate_case(model, tok, t, **params)["output_ids"][0] for t in (main, second)]
        c["single_output_ids"] = singles
        cases[-1]["single_output_ids"] = singles
        for row, single in zip(c["output_ids"], singles):
            assert strip_pad(row, pad) == strip_pad(single, pad), (label, row, single)
    assert len(greedy["output_ids"][0]) > 4, ("greedy output too short", greedy["output_ids"])
    return cases


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
    except (Exception, BaseException) as e:  # noqa: BLE001
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


def gen_pipe(folder, task):
    pipe = pipeline(task, model=str(folder), tokenizer=str(folder), device="cpu")
    info = {
        "task": task,
        "resolved_task": pipe.task,  # pipeline("translation") may resolve to translation_xx_to_yy
        "prefix": pipe.prefix,
        # the pipeline's effective generation config (pipeline defaults + model's generation
        # config + task_specific_params), as a diff against GenerationConfig() defaults
        "generation_config": to_py(pipe.generation_config.to_diff_dict()),
    }
    info["generation_config"].pop("transformers_version", None)
    return pipe, info


def s2s_pipeline_cases(name, folder, tasks):
    cases, infos = [], []
    short = [TEXTS[5], TEXTS[1]]
    for task in tasks:
        pipe, info = gen_pipe(folder, task)
        infos.append(info)
        greedy = {"max_new_tokens": 8, "num_beams": 1, "do_sample": False}
        cases += [
            run_case(name, pipe, task, [short[0]]),  # all defaults of the pipeline
            run_case(name, pipe, task, short, greedy),
            run_case(name, pipe, task, short, {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2}),
            run_case(name, pipe, task, short, greedy, batch_size=2, call="list"),
            run_case(name, pipe, task, short, {"max_new_tokens": 6, "num_beams": 2, "num_return_sequences": 2},
                     batch_size=2, call="list"),
            run_case(name, pipe, task, short, {"max_new_tokens": 6, "num_beams": 1, "return_tensors": True}),
        ]
        if task == "summarization":
            cases += [
                run_case(name, pipe, task, [SUM_TEXT], {"max_length": 12, "min_length": 5}),
                run_case(name, pipe, task, [SUM_TEXT], {"max_new_tokens": 10, "min_length": 6, "num_beams": 2}),
                run_case(name, pipe, task, [SUM_TEXT, TEXTS[5]], {"max_new_tokens": 10}, batch_size=2, call="list"),
            ]
        if task == "translation" and name == "t5":
            # pipeline("translation") on a model whose task_specific_params has translation_* keys
            # silently becomes the first such task (translation_en_to_de): prefix applied.
            cases.append(
                run_case(name, pipe, task, [short[0]], {"src_lang": "en", "tgt_lang": "de", "max_new_tokens": 8})
            )
    for c in cases:
        if c is not None:
            c["pipeline"] = next(i for i in infos if i["task"] == c["task"])
    return [c for c in cases if c is not None]


def zs_pipeline_cases(name, folder):
    pipe = pipeline("zero-shot-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    cases = [
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES, {"candidate_labels": ZS_LABELS}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES, {"candidate_labels": ["politics"]}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES, {"candidate_labels": "sports"}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES,
                 {"candidate_labels": "politics, sports,science , "}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES,
                 {"candidate_labels": ZS_LABELS, "multi_label": True}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES,
                 {"candidate_labels": ZS_LABELS, "hypothesis_template": "The topic is {}."}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES,
                 {"candidate_labels": ZS_LABELS, "hypothesis_template": "The topic is {}.", "multi_label": True}),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES, {"candidate_labels": ZS_LABELS},
                 call="list"),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES, {"candidate_labels": ZS_LABELS},
                 batch_size=2, call="list"),
        run_case(name, pipe, "zero-shot-classification", ZS_SEQUENCES,
                 {"candidate_labels": ZS_LABELS, "multi_label": True}, batch_size=2, call="list"),
    ]
    # The pipeline tokenises each (sequence, hypothesis) pair on its own; record them.
    pairs = [(ZS_SEQUENCES[0], f"This example is {lab}.") for lab in ZS_LABELS]
    return [c for c in cases if c is not None], pipe.entailment_id, pairs


def generation_config_json(folder):
    p = folder / "generation_config.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text(encoding="utf-8"))
    d.pop("transformers_version", None)
    return d


def expected_seq2seq(name, folder, tasks, slow_tok=None, targets=(), margins=None):
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval()
    texts = TEXTS + TOK_EXTRA + ([T5_SENTINEL_TEXT] if "t5" in name else [])
    exp = {
        "model": name,
        "transformers": transformers.__version__,
        "tokenizer_class": type(tok).__name__,
        "generation_config": generation_config_json(folder),
        "tokenization": tokenization_entries(tok, texts, slow=slow_tok, targets=targets),
        "raw": raw_seq2seq(model, tok, RAW_TEXTS),
        "generate": generate_cases(model, tok),
    }
    m = {}
    for t in GEN_TEXTS + [SUM_TEXT]:
        m[t] = greedy_margin(model, tok, t, 12)[0]
    if margins is not None:
        margins[name] = m
    exp["greedy_margins"] = m
    exp["pipelines"] = s2s_pipeline_cases(name, folder, tasks)
    write_json(EXPECTED / f"{name}.json", exp)
    print(f"  {name}: {len(exp['generate'])} generate, {len(exp['pipelines'])} pipeline cases, "
          f"min margin {min(m.values()):.4f}", file=sys.stderr)


def expected_zs(name, folder, note=None):
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    cases, entailment_id, pairs = zs_pipeline_cases(name, folder)
    exp = {
        "model": name,
        "transformers": transformers.__version__,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "entailment_id": entailment_id,
        "tokenization": tokenization_entries(tok, TEXTS),
        "raw": raw_seqcls(model, tok, pairs + [(TEXTS[1], TEXTS[5])]),
        "pipelines": cases,
    }
    if note:
        exp["note"] = note
    write_json(EXPECTED / f"{name}.json", exp)
    print(f"  {name}: {len(cases)} pipeline cases, entailment_id {entailment_id}", file=sys.stderr)


README = """\
# Seq2seq and zero-shot parity fixtures (generated; do not edit)

Regenerate with `HF_HUB_OFFLINE=1 python scripts/gen_fixtures_seq2seq.py` (after
`scripts/gen_fixtures.py`, whose roberta-base / bert-seqcls tokenizer files are reused), using
the pinned environment in `scripts/requirements-fixtures.txt` (transformers 4.57.1, torch 2.9.1,
sentencepiece, protobuf). Output is deterministic (two runs are byte-identical).

## models/<name>/
`save_pretrained` folders (float32) of tiny random seeded models: d_model 32, 2 encoder + 2
decoder layers, 4 heads, ffn 64, vocab ~450-500, max positions 64; tokenizer
`model_max_length` 48. LayerNorm weights/biases, all biases and BART/Marian `final_logits_bias`
are randomised. The last norm before the LM head has random-sign weights and the seed of each
generative model is the best of 40 (MANIFEST.json `seeds`) so that greedy outputs vary, depend on
the input and have no near-ties (greedy logit margins >= 0.05, see `greedy_margins`).

- t5: T5ForConditionalGeneration v1.0 (feed_forward_proj "relu", tied embeddings, so the decoder
  output is scaled by d_model**-0.5 before the LM head), relative_attention_num_buckets 32,
  max_distance 128, decoder_start_token_id 0, `task_specific_params` as in t5-small
  (summarization / translation_en_to_de with `prefix`). Tokenizer: SentencePiece unigram
  `spiece.model` (pad 0, eos 1, unk 2, no bos; 492 pieces + `<extra_id_0..7>` = ids 499..492)
  plus T5TokenizerFast `tokenizer.json` (Precompiled normalizer from a small NFKC-like rule set,
  Metaspace prepend_scheme "always", legacy=True).
- t5-v1_1: feed_forward_proj "gated-gelu", tie_word_embeddings false (separate lm_head, no
  rescale), same tokenizer and task_specific_params (only text2text-generation pipeline cases).
- t5-spiece-only: the t5 folder without tokenizer.json (spiece.model, tokenizer_config.json,
  special_tokens_map.json + config/weights/generation_config).
- bart: BartForConditionalGeneration, byte-level BPE (roberta-base vocab/merges via
  BartTokenizerFast), scale_embedding false, layernorm_embedding, learned positions (offset 2,
  66 rows), forced_bos 0, forced_eos 2, decoder_start 2, generation_config max_length 32.
- marian: MarianMTModel (opus-mt-en-de layout): sinusoidal positions (NOT saved in the
  safetensors; sin in the first half of each vector, cos in the second), scale_embedding true,
  random `final_logits_bias`, swish, decoder_start = pad = last id, eos 0.
  Tokenizer (slow only, no tokenizer.json): source.spm / target.spm (two unigram models) whose
  pieces map to ids through the joint vocab.json ("</s>" 0, "<unk>" 1, ..., "<pad>" last);
  generation_config: num_beams 4, max_length 40, bad_words_ids [[pad]].
- bart-nli (BartForSequenceClassification, contradiction/neutral/entailment), roberta-nli
  (CONTRADICTION/NEUTRAL/ENTAILMENT), bert-no-entailment (LABEL_0/LABEL_1).

## expected/<name>.json
```
{
  "model", "transformers", "tokenizer_class", "generation_config": generation_config.json | null,
  "tokenization": [{"text" | "text_target", "input_ids", "attention_mask", "tokens",
                    "decoded" (decode(ids, skip_special_tokens=True)),
                    "input_ids_slow" (t5*: slow T5Tokenizer; asserted equal to the fast ids)}],
      # tokenizer(text) / tokenizer(text_target=...) (marian), no truncation
  "raw": [{"text", "input_ids", "attention_mask", "decoder_input_ids",
           "encoder_last_hidden_state": [seq][d_model], "logits": [dec_seq][vocab]}],
      # seq2seq: one unpadded input, decoder_input_ids = [decoder_start] + first 2 ids of the text
      # nli / bert-no-entailment: [{"text", "text_pair", "input_ids", "token_type_ids"|null,
      #                             "attention_mask", "logits": [num_labels]}]
  "generate": [{"name", "input": str | [str, str], "params", "input_ids", "attention_mask",
                "output_ids": [[...]], "output_text": [...], "sequences_scores"?, "single_output_ids"?}],
      # model.generate(**tokenizer(input, padding=True), **params) with the model's generation
      # config underneath (forced_bos etc. apply). output_ids = full decoder sequences as HF
      # returns them: start token first (bart: [2, 0, ...] because of forced_bos), rows padded
      # with pad_token_id after eos (in batches and beam outputs). output_text = batch_decode(
      # skip_special_tokens=True). Batch cases also carry single_output_ids (each input alone);
      # asserted equal to the batch rows up to trailing pad.
  "greedy_margins": {text: smallest top1-top2 score gap over 12 greedy steps},
  "pipelines": [{"task", "params", "batch_size", "call", "inputs", "outputs",
                 "pipeline": {"task", "resolved_task", "prefix", "generation_config"}}]
      # call == "single": outputs[i] = pipeline(inputs[i], **params)
      # call == "list":   outputs    = pipeline(inputs, **params[, batch_size=batch_size])
      # "pipeline" (generation tasks): the task asked for, the task after resolution, its prefix, and its
      # effective generation config as a diff against GenerationConfig() defaults.
  "entailment_id", "id2label", "note" (zero-shot fixtures)
}
```
Floats are exact float32/float64 values as Python `repr`. Zero-shot `batch_size=2` runs pad
pairs together, so scores differ from the unbatched ones in the last bits: compare with a tolerance.

HF 4.57 behaviours the fixtures pin down:
- text2text/summarization/translation: a str input gives a list of dicts (one per returned
  sequence); a list input gives a flat list of dicts when num_return_sequences == 1, else a list
  of lists. `return_tensors=True` gives `*_token_ids` (full sequence incl. start token).
- Pipeline generation defaults: max_new_tokens 256 and num_beams 4, each overridden by a non-default
  value in the model's generation_config; max_new_tokens is then dropped if that config sets
  max_length != 20 (bart, marian). task_specific_params[task] is applied on top (prefix popped
  and prepended to every input). When max_new_tokens is set it wins over any max_length, including
  a max_length passed at call time (t5 summarization {"max_length": 12} still generates up to 256
  new tokens).
- pipeline("translation") on t5 resolves to the first translation_* key of task_specific_params
  (translation_en_to_de): its prefix is used even with src_lang/tgt_lang.
- zero-shot: candidate_labels string split on "," (stripped, empties dropped); hypothesis =
  template.format(label); each (sequence, hypothesis) pair tokenised on its own
  (truncation only_first). entailment id = first label2id key whose lower() starts with
  "entail", else -1 (warning only; -1 = last logit). One label or multi_label: softmax over
  [contradiction (0, or -1 if entailment is 0), entailment] per label; otherwise softmax of the
  entailment logits across labels. Labels sorted by descending score. A str sequence gives a
  dict, a list gives a list of dicts.
- Marian: sacremoses is not installed, so no Moses punctuation normalisation; decode uses
  target.spm; pieces missing from vocab.json become <unk> (1).
"""


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    assert (ENCODER_MODELS / "roberta-base" / "vocab.json").exists(), "run scripts/gen_fixtures.py first"
    if FIX.exists():
        shutil.rmtree(FIX)
    MODELS.mkdir(parents=True)
    EXPECTED.mkdir(parents=True)

    work = Path(tempfile.mkdtemp(prefix="ferro-s2s-fixtures-"))
    names, margins = [], {}
    try:
        toks = build_tokenizers(work)

        # --- T5 v1.0 (relu, tied embeddings -> lm_head input scaled by d_model**-0.5)
        tok = toks["t5"]
        for name, gated in (("t5", False), ("t5-v1_1", True)):
            print(f"building {name}", file=sys.stderr)
            model = pick_seed(name, T5ForConditionalGeneration, t5_config(tok, gated), tok)
            folder = save_folder(name, model, tok)
            assert (folder / "spiece.model").exists() and (folder / "tokenizer.json").exists()
            check_same(model, T5ForConditionalGeneration.from_pretrained(str(folder)), name)
            tasks = ["text2text-generation", "summarization", "translation_en_to_de"]
            if name == "t5":
                tasks.append("translation")
            else:
                tasks = ["text2text-generation"]
            expected_seq2seq(name, folder, tasks, slow_tok=toks["t5-slow"], margins=margins)
            names.append(name)

        # --- t5-spiece-only: same weights, tokenizer = spiece.model + configs only
        name = "t5-spiece-only"
        print(f"building {name}", file=sys.stderr)
        folder = MODELS / name
        shutil.copytree(MODELS / "t5", folder)
        (folder / "tokenizer.json").unlink()
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
            "spiece.model", "tokenizer_config.json",
        ], sorted(p.name for p in folder.iterdir())
        slow = T5Tokenizer.from_pretrained(str(folder))
        fast = T5TokenizerFast.from_pretrained(str(folder))  # converted from spiece.model
        texts = TEXTS + TOK_EXTRA + [T5_SENTINEL_TEXT]
        exp = {
            "model": name,
            "transformers": transformers.__version__,
            "note": "same weights as t5; no tokenizer.json. input_ids = T5TokenizerFast converted from "
            "spiece.model, input_ids_slow = T5Tokenizer (sentencepiece); asserted equal.",
            "tokenization": tokenization_entries(fast, texts, slow=slow),
        }
        # one pipeline case end-to-end (AutoTokenizer converts spiece.model to a fast tokenizer)
        pipe, info = gen_pipe(folder, "text2text-generation")
        c = run_case(name, pipe, "text2text-generation", [TEXTS[5], TEXTS[1]],
                     {"max_new_tokens": 8, "num_beams": 1, "do_sample": False})
        c["pipeline"] = info
        exp["pipelines"] = [c]
        write_json(EXPECTED / f"{name}.json", exp)
        names.append(name)

        # --- BART
        name = "bart"
        print(f"building {name}", file=sys.stderr)
        tok = toks["bart"]
        cfg = bart_config(tok, task_specific_params=json.loads(json.dumps(BART_TASK_PARAMS)))
        gen_cfg = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.eos_token_id,
            forced_bos_token_id=tok.bos_token_id,
            forced_eos_token_id=tok.eos_token_id,
            max_length=32,  # learned positions: 64 max; != 20 so the pipelines' max_new_tokens=256 is dropped
        )
        model = pick_seed(name, BartForConditionalGeneration, cfg, tok, gen_cfg)
        folder = save_folder(name, model, tok)
        # transformers 4.57 moves forced_bos_token_id out of config.json into
        # generation_config.json on save; Hub BART checkpoints (bart-large-cnn) have it in both.
        cfg_path = folder / "config.json"
        cfg_json = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg_json["forced_bos_token_id"] = tok.bos_token_id
        cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        check_same(model, BartForConditionalGeneration.from_pretrained(str(folder)), name)
        expected_seq2seq(name, folder, ["text2text-generation", "summarization"], margins=margins)
        names.append(name)

        # --- Marian (opus-mt-en-de like)
        name = "marian"
        print(f"building {name}", file=sys.stderr)
        tok = toks["marian"]
        pad = tok.pad_token_id
        gen_cfg = GenerationConfig(
            bad_words_ids=[[pad]],
            bos_token_id=0,
            decoder_start_token_id=pad,
            eos_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id,
            pad_token_id=pad,
            max_length=40,  # sinusoidal table has 64 rows
            num_beams=4,
        )
        model = pick_seed(name, MarianMTModel, marian_config(tok), tok, gen_cfg)
        folder = save_folder(name, model, tok)
        assert not (folder / "tokenizer.json").exists()
        check_same(model, MarianMTModel.from_pretrained(str(folder)), name)
        expected_seq2seq(name, folder, ["translation"], targets=TARGET_TEXTS, margins=margins)
        names.append(name)

        # --- zero-shot NLI classifiers
        zs = [
            ("bart-nli", BartForSequenceClassification,
             bart_config(toks["bart"], init_std=INIT_STD, **seqcls_kw(NLI_LABELS)), toks["bart"]),
            ("roberta-nli", RobertaForSequenceClassification,
             RobertaConfig(
                 vocab_size=len(toks["roberta"]), hidden_size=D_MODEL, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=MAX_POS + 2,
                 type_vocab_size=1, initializer_range=INIT_STD, pad_token_id=toks["roberta"].pad_token_id,
                 bos_token_id=toks["roberta"].bos_token_id, eos_token_id=toks["roberta"].eos_token_id,
                 **seqcls_kw(NLI_LABELS_UPPER)), toks["roberta"]),
            ("bert-no-entailment", BertForSequenceClassification,
             BertConfig(
                 vocab_size=len(toks["bert"]), hidden_size=D_MODEL, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=MAX_POS,
                 type_vocab_size=2, initializer_range=INIT_STD, pad_token_id=toks["bert"].pad_token_id,
                 **seqcls_kw(NO_ENTAIL_LABELS)), toks["bert"]),
        ]
        for name, cls, cfg, tok in zs:
            print(f"building {name}", file=sys.stderr)
            model = build(name, cls, cfg)
            folder = save_folder(name, model, tok)
            check_same(model, cls.from_pretrained(str(folder)), name)
            note = None
            if name == "bert-no-entailment":
                note = (
                    "No label starts with 'entail' (case-insensitive): transformers logs a warning "
                    "('Failed to determine 'entailment' label id from the label2id mapping in the model "
                    "config. Setting to -1. ...') and does NOT raise; entailment_id = -1 indexes the LAST "
                    "logit, contradiction id = 0 (it would be -1 only if entailment_id were 0). The recorded "
                    "pipeline outputs are what it returns anyway."
                )
            expected_zs(name, folder, note)
            names.append(name)

        manifest = {
            "generator": "scripts/gen_fixtures_seq2seq.py",
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "sentencepiece": spm.__version__,
                "numpy": np.__version__,
            },
            "sacremoses_installed": _has("sacremoses"),
            "model_max_length": MODEL_MAX_LENGTH,
            "models": names,
            "seeds": SEEDS,
            "min_greedy_margin": {k: min(v.values()) for k, v in margins.items()},
            "dropped_cases": DROPPED,
        }
        write_json_pretty(FIX / "MANIFEST.json", manifest)
        (FIX / "README.md").write_text(README, encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"done: {len(names)} models, {len(DROPPED)} dropped cases", file=sys.stderr)


def _has(mod):
    import importlib.util

    return importlib.util.find_spec(mod) is not None


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    main()
