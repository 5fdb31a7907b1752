#!/usr/bin/env python3
"""Reference fine-tuning runs with HF `Trainer`, for the parity tests of `ferroformers train`
(crates/ferroformers/tests/train.rs).

  pip install -r scripts/requirements-fixtures.txt      (torch 2.9.1, transformers 4.57.1)
  python3 scripts/gen_fixtures_train.py [--roundtrip target/release/ferroformers]

For each tiny sequence-classification fixture (tests/fixtures/models/{bert,distilbert,roberta}-seqcls:
random weights, hidden 32, 2 layers) it writes, under tests/fixtures/train/:
  <arch>-init/             the model with every dropout set to 0 (config.json, weights, tokenizer):
                           the base both trainers start from
  <arch>-final.safetensors every parameter after 5 optimizer steps of HF Trainer
  seqcls.jsonl             20 texts with string labels (negative / neutral / positive)
and tests/fixtures/expected/train-<arch>.json with the loss of each step (recorded in
compute_loss, unrounded), the gradient norm before clipping and the learning rate of each step.
bert-seqcls also runs with gradient_accumulation_steps 2 over one epoch (5 batches: groups of 2,
2 and 1, so 3 optimizer steps): tests/fixtures/train/bert-seqcls-accum-final.safetensors and
expected/train-bert-seqcls-accum.json.

Token classification, the same way for {bert,distilbert,roberta}-tokcls (the fixtures' own heads and
label2id, O B-PER I-PER B-ORG I-ORG B-LOC I-LOC B-MISC I-MISC): tests/fixtures/train/tokcls.jsonl holds 20
rows {"tokens": [words], "ner_tags": [BIO tags]}; preprocessing is run_ner.py's tokenize_and_align_labels
(is_split_into_words, truncation at 128, label_all_tokens False: the label on the first sub-token of each
word, -100 on the others and on special tokens; roberta's tokenizer loaded with add_prefix_space=True, the
init folder keeps the plain one), DataCollatorForTokenClassification. expected/train-<arch>.json adds
"label_ids" and "input_ids" of every row.

Question answering for {bert,distilbert,roberta}-qa: tests/fixtures/train/qa.jsonl (12 rows, SQuAD layout
of HF datasets: id, question, context, answers {text, answer_start}) and the same rows as SQuAD v1.1 JSON
(qa-squad.json); preprocessing is run_qa.py's prepare_train_features (question lstripped, max_length 48,
doc_stride 16, truncation only_second, overflowing windows, offsets; a window without the whole first answer
is labelled with the CLS index), dynamic padding. expected/train-<arch>.json adds "max_length",
"doc_stride" and "features" (example, input_ids, start_position, end_position of every window, in order).

expected/train-metrics.json: seqeval (default mode, as evaluate's seqeval overall_*) and SQuAD v1.1
(official exact match / F1) on small tricky cases. Needs seqeval (requirements-fixtures.txt).

Trainer settings: batch 4 in file order (SequentialSampler), max_steps 5, learning_rate 1e-3,
warmup_steps 2, weight_decay 0.01, max_grad_norm 1.0 (it clips), linear schedule,
optim adamw_torch, seed 42, one thread, deterministic algorithms.

--roundtrip BINARY: also train with our CLI on the same data (same settings, no shuffling is
not a CLI option, so this run shuffles: it checks loading, not the numbers), load the output
with AutoModelForSequenceClassification and compare its logits with ours (`ferroformers run
text-classification`), writing the largest difference to expected/train-roundtrip.json; likewise
bert-tokcls (token scores of `run token-classification --param aggregation_strategy=none` against
pipeline("token-classification"), under "token-classification") and bert-qa (answers and scores of
`run question-answering` against pipeline("question-answering"), under "question-answering").
"""
import argparse
import json
import re
import shutil
import string
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                          DataCollatorWithPadding, Trainer, TrainingArguments)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "train"
EXPECTED = FIX / "expected"
LABELS = ["negative", "neutral", "positive"]
ARCHS = {
    "bert-seqcls": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "distilbert-seqcls": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0),
    "roberta-seqcls": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
SETTINGS = dict(per_device_train_batch_size=4, max_steps=5, learning_rate=1e-3, warmup_steps=2,
                weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear", seed=42)


def texts():
    lines = [l.strip() for l in open(ROOT / "scripts" / "corpus.txt") if len(l.strip()) > 20]
    picked = lines[:16] + ["Great!", "Awful service.", "It is fine, I guess.", "Not bad at all"]
    return [{"text": t, "label": LABELS[(i * 7) % 3]} for i, t in enumerate(picked)]


class Rows(torch.utils.data.Dataset):
    def __init__(self, tok, rows):
        self.items = []
        for r in rows:
            enc = tok(r["text"], truncation=True, max_length=128)
            enc["labels"] = LABELS.index(r["label"])
            self.items.append(dict(enc))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Recording(Trainer):
    """File order, and the exact loss of every training step."""
    losses = []

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = out[0] if return_outputs else out
        if model.training:
            self.losses.append(loss.item())
        return out


def fresh_init(arch, model_cls, overrides):
    """The fixture with every dropout 0, saved as the common starting point of both trainers."""
    init = OUT / f"{arch}-init"
    if init.exists():
        shutil.rmtree(init)
    model = model_cls.from_pretrained(FIX / "models" / arch, **overrides)
    tok = AutoTokenizer.from_pretrained(FIX / "models" / arch)
    model.save_pretrained(init)
    tok.save_pretrained(init)
    return init


def train(name, model, dataset, collator, settings):
    """HF Trainer over `dataset` in order; writes <name>.safetensors, returns the recorded run."""
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim="adamw_torch", logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, **settings)
        trainer = Recording(model=model, args=args, train_dataset=dataset, data_collator=collator)
        Recording.losses = []
        trainer.train()
    steps = [h for h in trainer.state.log_history if "grad_norm" in h]
    total = trainer.state.max_steps
    lrs = [settings["learning_rate"] * (s / settings["warmup_steps"] if s < settings["warmup_steps"]
           else (total - s) / (total - settings["warmup_steps"]))
           for s in range(total)]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, OUT / f"{name}.safetensors", metadata={"format": "pt"})
    return {"settings": settings, "losses": Recording.losses,
            "grad_norms": [h["grad_norm"] for h in steps], "learning_rates": lrs,
            "parameters": sorted(state)}


def reference(arch, rows, accumulate=1):
    torch.manual_seed(0)
    init = OUT / f"{arch}-init"
    if accumulate == 1:
        fresh_init(arch, AutoModelForSequenceClassification, ARCHS[arch])
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForSequenceClassification.from_pretrained(init)
    settings = dict(SETTINGS)
    if accumulate > 1:
        settings.update(gradient_accumulation_steps=accumulate, max_steps=-1, num_train_epochs=1)
    name = f"{arch}-final" if accumulate == 1 else f"{arch}-accum-final"
    return train(name, model, Rows(tok, rows), DataCollatorWithPadding(tok), settings)


# ---------------------------------------------------------------- token classification

TOKCLS_ARCHS = {
    "bert-tokcls": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "distilbert-tokcls": dict(dropout=0.0, attention_dropout=0.0),
    "roberta-tokcls": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
}
MAX_WORDS = 14
# Corpus lines (cut to MAX_WORDS words) and their entities, in order: (words of the entity, type).
TOKCLS_LINES = [
    ("Hugging Face is a company based in New York City and Paris.",
     [("Hugging Face", "ORG"), ("New York City", "LOC"), ("Paris.", "LOC")]),
    ("John Smith works for Microsoft in Seattle, Washington.",
     [("John Smith", "PER"), ("Microsoft", "ORG"), ("Seattle,", "LOC"), ("Washington.", "LOC")]),
    ("Angela Merkel was the Chancellor of Germany for sixteen years.",
     [("Angela Merkel", "PER"), ("Germany", "LOC")]),
    ("The café in Zürich serves excellent coffee and croissants.", [("Zürich", "LOC")]),
    ("Apple Inc. reported revenue of $89.5 billion in the last quarter.", [("Apple Inc.", "ORG")]),
    ('The novel "Pride and Prejudice" was written by Jane Austen.',
     [('"Pride and Prejudice"', "MISC"), ("Jane Austen.", "PER")]),
    ("Leonardo da Vinci painted the Mona Lisa in the early sixteenth century.",
     [("Leonardo da Vinci", "PER"), ("Mona Lisa", "MISC")]),
    ("Tokyo is the capital of Japan and one of the largest cities in the world.",
     [("Tokyo", "LOC"), ("Japan", "LOC")]),
    ("Renée moved from Montréal to São Paulo in 2019.",
     [("Renée", "PER"), ("Montréal", "LOC"), ("São Paulo", "LOC")]),
    ("Hi there!", []),
    ("The Golden Gate Bridge spans the strait between San Francisco and Marin County.",
     [("Golden Gate Bridge", "LOC"), ("San Francisco", "LOC"), ("Marin County.", "LOC")]),
    ("Tim Berners-Lee invented the World Wide Web in 1989.",
     [("Tim Berners-Lee", "PER"), ("World Wide Web", "MISC")]),
    ("Björk is a famous singer from Reykjavík, Iceland.",
     [("Björk", "PER"), ("Reykjavík,", "LOC"), ("Iceland.", "LOC")]),
    ("Gabriel García Márquez wrote One Hundred Years of Solitude.",
     [("Gabriel García Márquez", "PER"), ("One Hundred Years of Solitude.", "MISC")]),
    ("Scientists at CERN discovered the Higgs boson in 2012.", [("CERN", "ORG"), ("Higgs", "MISC")]),
    ("Nestlé is a Swiss food and drink company based in Vevey.",
     [("Nestlé", "ORG"), ("Swiss", "MISC"), ("Vevey.", "LOC")]),
    ("Mercedes-Benz and BMW are German car brands.",
     [("Mercedes-Benz", "ORG"), ("BMW", "ORG"), ("German", "MISC")]),
    ("The Ångström unit is used to measure very small distances.", [("Ångström", "MISC")]),
    ("Sherlock Holmes is a fictional detective created by Arthur Conan Doyle.",
     [("Sherlock Holmes", "PER"), ("Arthur Conan Doyle.", "PER")]),
    ("The World Health Organization is headquartered in Geneva, Switzerland.",
     [("World Health Organization", "ORG"), ("Geneva,", "LOC"), ("Switzerland.", "LOC")]),
]


def tokcls_rows():
    corpus = {l.strip() for l in open(ROOT / "scripts" / "corpus.txt")}
    rows = []
    for line, entities in TOKCLS_LINES:
        assert line in corpus, line
        words = line.split()[:MAX_WORDS]
        tags, at = ["O"] * len(words), 0
        for phrase, kind in entities:
            span = phrase.split()
            while words[at:at + len(span)] != span:
                at += 1
                assert at < len(words), (line, phrase)
            tags[at:at + len(span)] = [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
            at += len(span)
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def align_labels(tok, rows, label2id):
    """run_ner.py's tokenize_and_align_labels, label_all_tokens=False."""
    enc = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=128)
    items = []
    for i, r in enumerate(rows):
        labels, previous = [], None
        for word in enc.word_ids(batch_index=i):
            if word is None:
                labels.append(-100)
            elif word != previous:
                labels.append(label2id[r["ner_tags"][word]])
            else:
                labels.append(-100)
            previous = word
        item = {k: enc[k][i] for k in enc.keys()}
        item["labels"] = labels
        # no row may be cut (the fixtures' model_max_length is 48, max_position_embeddings 64)
        assert len(item["input_ids"]) <= 48, (r, len(item["input_ids"]))
        assert sum(l != -100 for l in labels) == len(r["tokens"]), r
        items.append(item)
    return items


def tokcls_reference(arch, rows):
    torch.manual_seed(0)
    init = fresh_init(arch, AutoModelForTokenClassification, TOKCLS_ARCHS[arch])
    model = AutoModelForTokenClassification.from_pretrained(init)
    # run_ner.py loads roberta's tokenizer with add_prefix_space=True (words as input);
    # the init folder keeps the plain tokenizer
    extra = dict(add_prefix_space=True) if model.config.model_type == "roberta" else {}
    tok = AutoTokenizer.from_pretrained(init, **extra)
    assert set(model.config.label2id) == {t for r in rows for t in r["ner_tags"]}
    items = align_labels(tok, rows, model.config.label2id)
    ref = train(f"{arch}-final", model, items, DataCollatorForTokenClassification(tok), dict(SETTINGS))
    ref["label_ids"] = [it["labels"] for it in items]
    ref["input_ids"] = [it["input_ids"] for it in items]
    return ref


# ---------------------------------------------------------------- question answering

QA_ARCHS = {
    "bert-qa": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "distilbert-qa": dict(dropout=0.0, attention_dropout=0.0, qa_dropout=0.0),
    "roberta-qa": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
MAX_LENGTH, DOC_STRIDE = 48, 16
# (corpus lines joined with a space, [(question, [(answer, occurrence of it in the context), ...])])
QA_CONTEXTS = [
    (["The Eiffel Tower is located in Paris, France.", "Paris is known as the City of Light.",
      "The Tour de France ends on the Champs-Élysées in Paris."],
     [("What is Paris known as?", [("the City of Light", 0)]),
      ("Where does the Tour de France end?", [("the Champs-Élysées", 0)])]),
    (["Tim Berners-Lee invented the World Wide Web in 1989.", "Linus Torvalds created the Linux kernel.",
      "Mozilla develops the Firefox web browser."],
     [("Who develops the Firefox web browser?", [("Mozilla", 0)])]),
    (["Albert Einstein developed the theory of relativity."],
     [("What did Albert Einstein develop?", [("the theory of relativity", 0), ("relativity", 0)])]),
    (["Neil Armstrong was the first person to walk on the Moon.",
      "The Apollo 11 mission landed on the Moon in July 1969."],
     [("When did Apollo 11 land on the Moon?", [("July 1969", 0)])]),
    (["Sherlock Holmes is a fictional detective created by Arthur Conan Doyle.",
      "Harry Potter studied at Hogwarts School of Witchcraft and Wizardry.",
      "J.K. Rowling wrote the Harry Potter series."],
     [("Where did Harry Potter study?", [("Hogwarts School of Witchcraft and Wizardry", 0)])]),
    (["Hugging Face is a company based in New York City and Paris.",
      "John Smith works for Microsoft in Seattle, Washington."],
     [("Where is Hugging Face based?", [("New York City and Paris", 0)]),
      ("Who does John Smith work for?", [("Microsoft", 0)])]),
    (["Mount Everest is the highest mountain on Earth, at 8,849 metres."],
     [("   How high is Mount Everest?", [("8,849 metres", 0)])]),
    (["The Amazon River flows through Brazil, Peru and Colombia.",
      "The Amazon rainforest is home to millions of species.",
      "The Nile is often regarded as the longest river in the world."],
     [("Which river is the longest in the world?", [("The Nile", 0)])]),
    (["Marie Curie won two Nobel Prizes, in physics and in chemistry.",
      "Ada Lovelace is considered the first computer programmer."],
     [("Who is considered the first computer programmer?", [("Ada Lovelace", 0)])]),
    (["The café in Zürich serves excellent coffee and croissants."],
     [("What does the café in Zürich serve?", [("excellent coffee and croissants", 0)])]),
]


def qa_rows():
    corpus = {l.strip() for l in open(ROOT / "scripts" / "corpus.txt")}
    rows = []
    for lines, questions in QA_CONTEXTS:
        assert all(l in corpus for l in lines), lines
        context = " ".join(lines)
        for question, answers in questions:
            texts_, starts = [], []
            for text, occurrence in answers:
                at = -1
                for _ in range(occurrence + 1):
                    at = context.index(text, at + 1)
                assert context[at:at + len(text)] == text
                texts_.append(text)
                starts.append(at)
            rows.append({"id": f"q{len(rows)}", "question": question, "context": context,
                         "answers": {"text": texts_, "answer_start": starts}})
    return rows


def squad_json(rows):
    """The same rows in SQuAD v1.1's nested layout, one paragraph per distinct context."""
    data = []
    for r in rows:
        qa = {"id": r["id"], "question": r["question"],
              "answers": [{"text": t, "answer_start": s}
                          for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        if data and data[-1]["paragraphs"][0]["context"] == r["context"]:
            data[-1]["paragraphs"][0]["qas"].append(qa)
        else:
            data.append({"title": f"context{len(data)}",
                         "paragraphs": [{"context": r["context"], "qas": [qa]}]})
    return {"version": "1.1", "data": data}


def prepare_train_features(tok, rows):
    """run_qa.py's prepare_train_features (pad_to_max_length False), one feature per window."""
    pad_on_right = tok.padding_side == "right"
    assert pad_on_right
    questions = [r["question"].lstrip() for r in rows]
    contexts = [r["context"] for r in rows]
    enc = tok(questions, contexts, truncation="only_second", max_length=min(MAX_LENGTH, tok.model_max_length),
              stride=DOC_STRIDE, return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        input_ids = enc["input_ids"][i]
        if tok.cls_token_id in input_ids:
            cls_index = input_ids.index(tok.cls_token_id)
        elif tok.bos_token_id in input_ids:
            cls_index = input_ids.index(tok.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = enc.sequence_ids(i)
        sample = enc["overflow_to_sample_mapping"][i]
        answers = rows[sample]["answers"]
        if len(answers["answer_start"]) == 0:
            start = end = cls_index
        else:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start = 0
            while sequence_ids[token_start] != 1:
                token_start += 1
            token_end = len(input_ids) - 1
            while sequence_ids[token_end] != 1:
                token_end -= 1
            if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
                start = end = cls_index
            else:
                while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                    token_start += 1
                start = token_start - 1
                while offsets[token_end][1] >= end_char:
                    token_end -= 1
                end = token_end + 1
        item = {k: enc[k][i] for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
        item["start_positions"] = start
        item["end_positions"] = end
        features.append((sample, item))
    return features


def qa_reference(arch, rows):
    torch.manual_seed(0)
    init = fresh_init(arch, AutoModelForQuestionAnswering, QA_ARCHS[arch])
    model = AutoModelForQuestionAnswering.from_pretrained(init)
    tok = AutoTokenizer.from_pretrained(init)
    features = prepare_train_features(tok, rows)
    items = [item for _, item in features]
    ref = train(f"{arch}-final", model, items, DataCollatorWithPadding(tok), dict(SETTINGS))
    ref["max_length"] = MAX_LENGTH
    ref["doc_stride"] = DOC_STRIDE
    ref["features"] = [{"example": sample, "input_ids": item["input_ids"],
                        "start_position": item["start_positions"], "end_position": item["end_positions"]}
                       for sample, item in features]
    return ref


# ---------------------------------------------------------------- metrics

SEQEVAL_CASES = [
    # a clean match, a missed entity, a spurious one
    ([["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]],
     [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O", "B-MISC"]]),
    # I- after O starts an entity; a type switch inside a span (B-PER I-LOC) makes two entities
    ([["O", "I-PER", "I-PER", "O", "B-PER", "I-PER", "O"], ["B-LOC", "I-LOC", "I-LOC", "O"]],
     [["O", "B-PER", "I-PER", "O", "B-PER", "I-LOC", "O"], ["I-LOC", "I-LOC", "B-LOC", "O"]]),
    # IOBES tags in the default (lenient) mode
    ([["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "O", "B-ORG", "E-ORG"]],
     [["S-PER", "O", "B-LOC", "E-LOC", "S-LOC", "O", "B-ORG", "I-ORG"]]),
    # a prediction without any entity: precision 0/0 -> 0
    ([["B-MISC", "I-MISC", "O"], ["O", "B-PER"]],
     [["O", "O", "O"], ["O", "O"]]),
    # entities at the end of one sentence and the start of the next stay two entities
    ([["O", "B-ORG", "I-ORG"], ["I-ORG", "O"], ["B-PER", "I-PER"], ["I-PER"]],
     [["O", "B-ORG", "I-ORG"], ["I-ORG", "O"], ["B-PER", "I-PER"], ["B-PER"]]),
    # B- after B- of the same type, I- of another type after O, a lone I- at the end
    ([["B-LOC", "B-LOC", "O", "I-MISC", "O", "O", "B-PER"]],
     [["B-LOC", "I-LOC", "O", "I-MISC", "I-MISC", "O", "I-PER"]]),
]

SQUAD_CASES = [
    # articles, casing, punctuation
    (["The Eiffel Tower", "PARIS, France!", "an apple a day"],
     [["Eiffel Tower"], ["paris france"], ["apple day"]]),
    # empty prediction; an article alone normalises to "" (exact match, but f1 0)
    (["", "a", "the"], [["Mozilla"], ["the"], ["an answer"]]),
    # partial overlap, the best of several golds
    (["the theory of relativity by Einstein", "New York"],
     [["theory of relativity", "relativity"], ["New York City and Paris", "New York City"]]),
    # repeated tokens count once per gold occurrence
    (["paris paris paris", "new new york"], [["paris london"], ["new york new york"]]),
    # hyphens and other ASCII punctuation vanish inside words; non-ASCII quotes and accents stay
    (["Berners-Lee", "Zürich’s café", "8,849 metres.", "J.K. Rowling"],
     [["BernersLee"], ["zürich's cafe"], ["8849 metres"], ["jk rowling"]]),
    # articles only as whole words; extra white space
    (["  there   is\tthe\nanswer ", "theatre"], [["there is answer"], ["atre"]]),
]


def normalize_answer(s):
    """SQuAD v1.1's official normalisation (what `evaluate`'s squad metric runs)."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_exact(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad_score(predictions, references):
    em = sum(max(squad_exact(p, g) for g in golds) for p, golds in zip(predictions, references))
    f1 = sum(max(squad_f1(p, g) for g in golds) for p, golds in zip(predictions, references))
    return 100.0 * em / len(predictions), 100.0 * f1 / len(predictions)


def metrics_reference():
    import warnings
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
    seq = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for true, pred in SEQEVAL_CASES:
            case = {"true": true, "pred": pred, "precision": precision_score(true, pred),
                    "recall": recall_score(true, pred), "f1": f1_score(true, pred),
                    "accuracy": accuracy_score(true, pred)}
            # evaluate's seqeval reports classification_report's micro average as overall_*
            micro = classification_report(true, pred, output_dict=True)["micro avg"]
            assert (micro["precision"], micro["recall"], micro["f1-score"]) == \
                (case["precision"], case["recall"], case["f1"]), (case, micro)
            seq.append({k: float(v) if not isinstance(v, list) else v for k, v in case.items()})
    squad = []
    for predictions, references in SQUAD_CASES:
        em, f1 = squad_score(predictions, references)
        squad.append({"predictions": predictions, "references": references, "exact_match": em, "f1": f1})
    return {"seqeval": seq, "squad": squad}


def roundtrip(binary, rows):
    """Our CLI trains, Python loads the result; logits compared on the training texts."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        subprocess.run([binary, "train", "text-classification", "--model", str(OUT / "bert-seqcls-init"),
                        "--train", str(OUT / "seqcls.jsonl"), "--output", str(out),
                        "--max-steps", "3", "--learning-rate", "1e-3"], check=True)
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        sentences = [r["text"] for r in rows[:6]]
        with torch.no_grad():
            enc = tok(sentences, padding=True, return_tensors="pt")
            py = torch.softmax(model(**enc).logits, -1)
        ours = subprocess.run([binary, "run", "text-classification", "--model", str(out),
                               "--param", "top_k=null", "--input", "-"], input="\n".join(json.dumps(s) for s in sentences),
                              capture_output=True, text=True, check=True).stdout.splitlines()
        diff = 0.0
        for i, line in enumerate(ours):
            for item in json.loads(line):
                j = model.config.label2id[item["label"]]
                diff = max(diff, abs(item["score"] - py[i, j].item()))
        return {"max_abs_score_diff": diff, "labels": model.config.id2label,
                "architectures": model.config.architectures}


def roundtrip_tokcls(binary, rows):
    """Our CLI fine-tunes bert-tokcls, Python loads it: per-token scores of the non-O tokens compared."""
    from transformers import pipeline
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        subprocess.run([binary, "train", "token-classification", "--model", str(OUT / "bert-tokcls-init"),
                        "--train", str(OUT / "tokcls.jsonl"), "--output", str(out),
                        "--max-steps", "3", "--learning-rate", "1e-3"], check=True)
        model = AutoModelForTokenClassification.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        sentences = [" ".join(r["tokens"]) for r in rows[:6]]
        pipe = pipeline("token-classification", model=model, tokenizer=tok, aggregation_strategy="none",
                        device="cpu")
        ours = subprocess.run([binary, "run", "token-classification", "--model", str(out),
                               "--param", "aggregation_strategy=none", "--input", "-"],
                              input="\n".join(json.dumps(s) for s in sentences),
                              capture_output=True, text=True, check=True).stdout.splitlines()
        assert len(ours) == len(sentences), ours
        diff, mismatched, compared = 0.0, 0, 0
        for sentence, line in zip(sentences, ours):
            py = {e["index"]: e for e in pipe(sentence)}
            mine = {e["index"]: e for e in json.loads(line)}
            mismatched += len(set(py) ^ set(mine))
            for index in set(py) & set(mine):
                compared += 1
                if py[index]["entity"] != mine[index]["entity"]:
                    mismatched += 1
                diff = max(diff, float(abs(py[index]["score"] - mine[index]["score"])))
        return {"max_abs_score_diff": diff, "tokens_compared": compared, "tokens_mismatched": mismatched,
                "labels": model.config.id2label, "architectures": model.config.architectures}


def roundtrip_qa(binary, rows):
    """Our CLI fine-tunes bert-qa, Python loads it: the answers of both pipelines compared."""
    from transformers import pipeline
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        subprocess.run([binary, "train", "question-answering", "--model", str(OUT / "bert-qa-init"),
                        "--train", str(OUT / "qa.jsonl"), "--output", str(out),
                        "--max-length", str(MAX_LENGTH), "--doc-stride", str(DOC_STRIDE),
                        "--max-steps", "3", "--learning-rate", "1e-3"], check=True)
        model = AutoModelForQuestionAnswering.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        pipe = pipeline("question-answering", model=model, tokenizer=tok, device="cpu")
        picked = rows[:4]
        ours = subprocess.run([binary, "run", "question-answering", "--model", str(out), "--input", "-"],
                              input="\n".join(json.dumps({"question": r["question"], "context": r["context"]})
                                              for r in picked),
                              capture_output=True, text=True, check=True).stdout.splitlines()
        assert len(ours) == len(picked), ours
        diff, mismatched = 0.0, 0
        for r, line in zip(picked, ours):
            mine = json.loads(line)
            mine = mine[0] if isinstance(mine, list) else mine
            py = pipe(question=r["question"], context=r["context"])
            if py["answer"] != mine["answer"]:
                mismatched += 1
            diff = max(diff, float(abs(py["score"] - mine["score"])))
        return {"max_abs_score_diff": diff, "answers_mismatched": mismatched,
                "architectures": model.config.architectures}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--roundtrip", help="our CLI binary: also check Python loads its output")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = texts()
    (OUT / "seqcls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for arch in ARCHS:
        ref = reference(arch, rows)
        (EXPECTED / f"train-{arch}.json").write_text(json.dumps(ref, indent=1) + "\n")
        print(arch, "losses", [round(x, 5) for x in ref["losses"]], file=sys.stderr)
    ref = reference("bert-seqcls", rows, accumulate=2)
    (EXPECTED / "train-bert-seqcls-accum.json").write_text(json.dumps(ref, indent=1) + "\n")
    print("bert-seqcls accumulate 2: losses", [round(x, 5) for x in ref["losses"]],
          "grad norms", [round(x, 5) for x in ref["grad_norms"]], file=sys.stderr)

    tok_rows = tokcls_rows()
    (OUT / "tokcls.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tok_rows))
    for arch in TOKCLS_ARCHS:
        ref = tokcls_reference(arch, tok_rows)
        (EXPECTED / f"train-{arch}.json").write_text(json.dumps(ref, indent=1) + "\n")
        print(arch, "losses", [round(x, 5) for x in ref["losses"]], file=sys.stderr)

    q_rows = qa_rows()
    (OUT / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in q_rows))
    (OUT / "qa-squad.json").write_text(json.dumps(squad_json(q_rows), indent=1, ensure_ascii=False) + "\n")
    for arch in QA_ARCHS:
        ref = qa_reference(arch, q_rows)
        (EXPECTED / f"train-{arch}.json").write_text(json.dumps(ref, indent=1) + "\n")
        print(arch, len(ref["features"]), "features, losses", [round(x, 5) for x in ref["losses"]],
              file=sys.stderr)

    (EXPECTED / "train-metrics.json").write_text(json.dumps(metrics_reference(), indent=1, ensure_ascii=False)
                                                 + "\n")

    if a.roundtrip:
        r = roundtrip(a.roundtrip, rows)
        r["token-classification"] = roundtrip_tokcls(a.roundtrip, tok_rows)
        r["question-answering"] = roundtrip_qa(a.roundtrip, q_rows)
        (EXPECTED / "train-roundtrip.json").write_text(json.dumps(r, indent=1) + "\n")
        print("round trip", r, file=sys.stderr)


if __name__ == "__main__":
    main()
