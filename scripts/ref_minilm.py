#!/usr/bin/env python3
"""Reference embeddings for sentence-transformers/all-MiniLM-L6-v2.

Loads the snapshot that scripts/fetch-models.sh put into the HF hub cache,
offline, with sentence-transformers, and writes
tests/fixtures/expected/all-minilm-l6-v2.json:

  model, snapshot_commit, library versions,
  st_max_seq_length (256, sentence_bert_config.json),
  tokenizer_model_max_length (512, tokenizer_config.json; ST overwrites the
      loaded tokenizer's model_max_length with 256, so it is read from the file),
  tokenizer_json_truncation_max_length (128: the truncation stored inside
      tokenizer.json. transformers and sentence-transformers override it;
      a bare `tokenizers` load applies it),
  texts, input_ids (per text, as the tokenizer gives them with
      truncation=True, max_length=st_max_seq_length, with [CLS]/[SEP]),
  untruncated_lengths (token count without truncation),
  embeddings (model.encode(texts, normalize_embeddings=True), float32),
  normalized: true, similarity_0_1 (cosine of texts[0] and texts[1]).

Float values are written as the shortest decimal that round-trips to the same
float32 (numpy's repr). Parse them as f32 to get the exact float32 bits.

Usage: /work/venv/py/bin/python scripts/ref_minilm.py [--snapshot DIR] [--out FILE]
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
REPO_ROOT = Path(__file__).resolve().parent.parent


def hub_cache_root() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def snapshot_dir(hub_id: str) -> Path:
    repo = hub_cache_root() / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if not ref.is_file():
        sys.exit(f"error: {ref} not found; run scripts/fetch-models.sh minilm first")
    return repo / "snapshots" / ref.read_text().strip()


# Words for a long text that must tokenize to well over 256 word-pieces.
LONG_TEXT = (
    "The history of computing is a story of abstraction layered upon abstraction. "
    "Early machines were programmed by physically rewiring plugboards, and every "
    "calculation demanded hours of careful preparation by skilled operators. "
    "The stored-program concept changed everything: instructions and data lived "
    "side by side in memory, so a computer could be repurposed simply by loading "
    "a different sequence of numbers. Assemblers soon replaced hand-written machine "
    "code, compilers replaced assemblers for most everyday work, and operating "
    "systems emerged to share scarce hardware among many users at once. Time-sharing "
    "systems in the nineteen-sixties let dozens of people interact with a single "
    "mainframe through teletype terminals, each under the illusion of owning the "
    "whole machine. Minicomputers brought that experience to university departments "
    "and small laboratories; microprocessors then put it on ordinary desks. Networks "
    "connected those desks, first within buildings and later across continents, and "
    "the protocols that made the internet possible were deliberately simple, layered "
    "and tolerant of failure. Graphical interfaces, pioneered in research labs, made "
    "computers approachable for people who had never written a program. The web "
    "turned documents into a global, linked library, and search engines became the "
    "card catalogue for that library. Mobile phones squeezed all of this into a "
    "pocket, adding cameras, satellite positioning and always-on connectivity. Cloud "
    "platforms abstracted away the servers themselves, renting computation by the "
    "second. Machine learning, once a niche academic pursuit, now powers translation, "
    "speech recognition, recommendation and the retrieval of sentences by meaning "
    "rather than by exact keywords. Each new layer hides the complexity beneath it, "
    "yet every layer still depends on the humble transistor switching billions of "
    "times per second, on careful engineering of memory hierarchies, and on the "
    "patient work of people who document, test and maintain the software that "
    "everyone else takes for granted. Understanding those foundations remains "
    "valuable, because abstractions leak, performance surprises appear, and the "
    "engineers who can reason about every layer are the ones who fix the hardest "
    "problems when something inevitably goes wrong in production late at night."
)

TEXTS = [
    # 0/1: near-paraphrases (similarity_0_1 is their cosine)
    "A man is playing a guitar on stage.",
    "Someone is performing music with a guitar in front of an audience.",
    # short
    "Hello!",
    # accented / non-ASCII Latin
    "Le café de la gare était fermé à cause de la grève ; naïve façade à São Paulo et Zürich.",
    # long: > 256 word-pieces, so truncation at max_seq_length matters
    LONG_TEXT,
    # numbers, punctuation, symbols, mixed case
    "The GPU costs $1,299.99 (15% off) until 2024-12-31 — e-mail SALES@example.com!",
    # CJK + emoji (CJK chars split per character, emoji -> [UNK])
    "東京は日本の首都です。🍣 I love sushi.",
    # unrelated topic, whitespace oddities
    "  The   stock market\tfell sharply\nafter the announcement.  ",
]


def f32(x) -> float:
    """Shortest decimal that round-trips to the same float32."""
    import numpy as np
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, default=None)
    ap.add_argument("--out", type=Path,
                    default=REPO_ROOT / "tests" / "fixtures" / "expected" / "all-minilm-l6-v2.json")
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    snap = args.snapshot or snapshot_dir(HUB_ID)
    torch.manual_seed(0)
    model = SentenceTransformer(str(snap), device="cpu", local_files_only=True)
    model.eval()
    tok = model.tokenizer

    st_max = int(model.max_seq_length)
    # Read it from the file: sentence-transformers overwrites
    # tok.model_max_length with max_seq_length (256) when it loads the model.
    tok_max = int(json.loads((snap / "tokenizer_config.json").read_text())["model_max_length"])
    tj = json.loads((snap / "tokenizer.json").read_text())
    tj_trunc = (tj.get("truncation") or {}).get("max_length")

    emb = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True,
                       batch_size=len(TEXTS), precision="float32")
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), 384), (emb.dtype, emb.shape)

    input_ids = [tok(t, truncation=True, max_length=st_max)["input_ids"] for t in TEXTS]
    full_lens = [len(tok(t, truncation=False)["input_ids"]) for t in TEXTS]

    # Cross-check: ST's own tokenize() must agree with the ids we record.
    feats = model.tokenize(TEXTS)
    for i, ids in enumerate(input_ids):
        n = int(feats["attention_mask"][i].sum())
        assert feats["input_ids"][i][:n].tolist() == ids, f"ST tokenize mismatch on text {i}"
    assert max(full_lens) > st_max, "long text must exceed st_max_seq_length"

    # Cross-check encode() against a manual fp32 forward pass + mean pooling.
    with torch.no_grad():
        out = model[0].auto_model(**{k: v for k, v in feats.items()
                                     if k in ("input_ids", "attention_mask", "token_type_ids")})
        h = out.last_hidden_state
        m = feats["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        manual = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    max_diff = float(np.abs(manual - emb).max())
    assert max_diff < 1e-5, max_diff

    sim01 = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))

    doc = {
        "model": HUB_ID,
        "snapshot_commit": snap.name,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "dtype": "float32",
        "pooling": "mean",
        "normalized": True,
        "st_max_seq_length": st_max,
        "tokenizer_model_max_length": tok_max,
        "tokenizer_json_truncation_max_length": tj_trunc,
        "texts": TEXTS,
        "input_ids": input_ids,
        "untruncated_lengths": full_lens,
        "embeddings": [[f32(v) for v in row] for row in emb],
        "similarity_0_1": sim01,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); "
          f"lengths={[len(i) for i in input_ids]} untruncated={full_lens} "
          f"sim01={sim01:.6f} manual_vs_encode_maxdiff={max_diff:.2e}")


if __name__ == "__main__":
    main()
