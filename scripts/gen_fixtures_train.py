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

Trainer settings: batch 4 in file order (SequentialSampler), max_steps 5, learning_rate 1e-3,
warmup_steps 2, weight_decay 0.01, max_grad_norm 1.0 (it clips), linear schedule,
optim adamw_torch, seed 42, one thread, deterministic algorithms.

--roundtrip BINARY: also train with our CLI on the same data (same settings, no shuffling is
not a CLI option, so this run shuffles: it checks loading, not the numbers), load the output
with AutoModelForSequenceClassification and compare its logits with ours (`ferroformers run
text-classification`), writing the largest difference to expected/train-roundtrip.json.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          Trainer, TrainingArguments)

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


def reference(arch, rows, accumulate=1):
    torch.manual_seed(0)
    init = OUT / f"{arch}-init"
    if accumulate == 1:
        if init.exists():
            shutil.rmtree(init)
        model = AutoModelForSequenceClassification.from_pretrained(FIX / "models" / arch, **ARCHS[arch])
        tok = AutoTokenizer.from_pretrained(FIX / "models" / arch)
        model.save_pretrained(init)
        tok.save_pretrained(init)
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForSequenceClassification.from_pretrained(init)
    settings = dict(SETTINGS)
    if accumulate > 1:
        settings.update(gradient_accumulation_steps=accumulate, max_steps=-1, num_train_epochs=1)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim="adamw_torch", logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, **settings)
        trainer = Recording(model=model, args=args, train_dataset=Rows(tok, rows),
                            data_collator=DataCollatorWithPadding(tok))
        Recording.losses = []
        trainer.train()
    steps = [h for h in trainer.state.log_history if "grad_norm" in h]
    total = trainer.state.max_steps
    lrs = [settings["learning_rate"] * (s / settings["warmup_steps"] if s < settings["warmup_steps"]
           else (total - s) / (total - settings["warmup_steps"]))
           for s in range(total)]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    name = f"{arch}-final" if accumulate == 1 else f"{arch}-accum-final"
    save_file(state, OUT / f"{name}.safetensors", metadata={"format": "pt"})
    return {"settings": settings, "losses": Recording.losses,
            "grad_norms": [h["grad_norm"] for h in steps], "learning_rates": lrs,
            "parameters": sorted(state)}


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
    if a.roundtrip:
        r = roundtrip(a.roundtrip, rows)
        (EXPECTED / "train-roundtrip.json").write_text(json.dumps(r, indent=1) + "\n")
        print("round trip", r, file=sys.stderr)


if __name__ == "__main__":
    main()
