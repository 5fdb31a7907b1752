#!/usr/bin/env python3
"""Fine-tuning speed: `ferroformers train` against HF `Trainer` on the same model, data, batch
size, sequence length and threads, side by side in one run.

  scripts/fetch-models.sh minilm && scripts/fetch-datasets.sh movie-reviews
  cargo build --release -p ferroformers-cli
  /work/venv/bench/bin/python scripts/bench_train.py [--examples 800] [--batch 8] [--reps 3]
      [--threads 2] [--model sentence-transformers/all-MiniLM-L6-v2] [--eval]

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--examples", type=int, default=800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--eval", action="store_true",
                    help="also report accuracy on movie-reviews/test.jsonl after training")
    a = ap.parse_args()
    src = DATA / "movie-reviews" / "train.jsonl"
    if not src.is_file():
        sys.exit("run scripts/fetch-datasets.sh movie-reviews first")
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
        test = DATA / "movie-reviews" / "test.jsonl"
        for rep in range(a.reps):
            order = ["ours", "hf"] if rep % 2 == 0 else ["hf", "ours"]
            for e in order:
                out = Path(tmp) / f"{e}-{rep}"
                if e == "ours":
                    p, rss = timed([a.binary, "train", "text-classification", "--model", a.model,
                                    "--train", subset, "--output", out, "--num-train-epochs", "1",
                                    "--per-device-train-batch-size", a.batch, "--threads", a.threads,
                                    "--logging-steps", "1000000000"]
                                   + (["--eval", test] if a.eval else []), env)
                    state = json.loads((out / "trainer_state.json").read_text())
                    last = state["log_history"][-1]
                    r = {"samples_per_s": last["train_samples_per_second"], "loss": last["train_loss"]}
                    evals = [h for h in state["log_history"] if "eval_accuracy" in h]
                    if evals:
                        r["accuracy"] = evals[-1]["eval_accuracy"]
                else:
                    p, rss = timed([sys.executable, "-c", HF_CHILD, a.model, subset, a.examples, a.batch,
                                    a.threads, out, test if a.eval else "-"], env)
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                r["rss_mb"] = rss
                res.setdefault(e, []).append(r)
                print(f"rep {rep} {e}: {r['samples_per_s']:.1f} samples/s, loss {r['loss']:.4f}, "
                      f"RSS {rss:.0f} MB, test accuracy {r.get('accuracy', '-')}", file=sys.stderr)
    load1 = os.getloadavg()
    print(f"\nfine-tuning {a.model} on {a.examples} movie-review sentences, batch {a.batch}, 1 epoch, "
          f"{a.threads} threads, median of {a.reps}; CPU {cpu_model()}; load average before "
          f"{load0[0]:.2f}, after {load1[0]:.2f}")
    print("| trainer | samples/s | vs HF Trainer | peak RSS (MB) | mean train loss | test accuracy |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r["samples_per_s"] for r in res["hf"])
    for e, name in (("ours", "ferroformers train"), ("hf", "HF Trainer (torch)")):
        sps = statistics.median(r["samples_per_s"] for r in res[e])
        rss = statistics.median(r["rss_mb"] for r in res[e])
        loss = statistics.median(r["loss"] for r in res[e])
        accs = [r["accuracy"] for r in res[e] if "accuracy" in r]
        acc = f"{statistics.median(accs):.4f}" if accs else "-"
        print(f"| {name} | {sps:.1f} | {sps / base:.2f}x | {rss:.0f} | {loss:.4f} | {acc} |")


if __name__ == "__main__":
    main()
