#!/usr/bin/env python3
"""lm-evaluation-harness, unchanged, against `ferroformers serve`: its `local-completions`
model sends log-likelihood requests to /v1/completions (the prompt as token ids, `echo: true`,
`logprobs: 1`, `max_tokens: 1`) and reads the prompt's own log-probabilities back. The same task
then runs on lm-eval's `hf` model (transformers, the same GGUF dequantized to f32) in the same
run, and a second task asks for the answer by greedy generation (lm-eval's generate_until:
`stop`, `max_tokens`). Printed: both accuracies, how often the two pick the same answer, how far apart their
log-likelihoods are, and each side's time.

The task is built here from local data (the hub is unreachable): movie-review sentences
(scripts/fetch-datasets.sh movie-reviews, test split), each scored as " negative" and
" positive" after "Review: <text>\nSentiment:", lm-eval's multiple_choice type (`acc`).

    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install "lm-eval[api]==0.4.9.1" gguf \
        transformers==4.57.1 torch
    scripts/fetch-models.sh smollm2 && scripts/fetch-datasets.sh movie-reviews
    cargo build --release -p ferroformers-cli
    /tmp/lmeval/bin/python scripts/check_lm_eval.py --limit 200

The GGUF holds SmolLM2-135M-Instruct in Q4_1: ours runs it quantized, by default with int8
activations as llama.cpp (`--gguf-math int8`), transformers dequantizes it to f32, so their
log-likelihoods differ by that rounding; `--gguf-math exact` keeps f32 activations, and then
they must agree to ~1e-4. The test is that the harness runs and agrees, not a model ranking.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import cpu_model  # noqa: E402

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DATA = Path(os.environ.get("FERROFORMERS_DATA", Path.home() / ".cache/ferroformers/datasets"))

TASK = """task: ff_movie_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: [" negative", " positive"]
doc_to_target: "{{{{ 0 if label == 'negative' else 1 }}}}"
metric_list:
  - metric: acc
"""

# The same sentences answered by generation (lm-eval's generate_until: greedy, stop at a
# newline, at most 3 new tokens), the answer's first word checked against the label.
GEN_TASK = """task: ff_movie_sentiment_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Review: {{{{text}}}}\\nSentiment (positive or negative):"
doc_to_target: "{{{{label}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "(positive|negative)"
      - function: take_first
metric_list:
  - metric: exact_match
"""
TASKS = ["ff_movie_sentiment", "ff_movie_sentiment_gen"]


def wait_ready(base, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("the server exited")
        try:
            if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.3)
    sys.exit("the server did not get ready")


def loglikelihoods(result):
    """Per request of the task's samples: (doc id, choice index) -> log-likelihood."""
    out = {}
    for s in result["samples"]["ff_movie_sentiment"]:
        for i, r in enumerate(s["resps"]):
            out[(s["doc_id"], i)] = float(r[0][0])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--binary", default=str(ROOT / "target/release/ferroformers"))
    ap.add_argument("--port", type=int, default=3961)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf-math", default="int8", choices=["int8", "exact"],
                    help="the server's --gguf-math: int8 rounds "
                         "activations as llama.cpp does (the default), exact keeps f32 as "
                         "transformers does")
    ap.add_argument("--show", type=int, default=3,
                    help="print this many documents whose generated texts differ")
    a = ap.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    data = DATA / "movie-reviews" / "test.jsonl"
    if not data.is_file():
        sys.exit(f"{data} is missing: scripts/fetch-datasets.sh movie-reviews")
    hub = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache/huggingface/hub"))
    repo = hub / ("models--" + REPO.replace("/", "--"))
    gguf = repo / "snapshots" / (repo / "refs" / "main").read_text().strip() / FILE
    if not gguf.is_file():
        sys.exit(f"{gguf} is missing: scripts/fetch-models.sh smollm2")
    work = Path(tempfile.mkdtemp(prefix="ff-lmeval-"))
    (work / "tasks").mkdir()
    (work / "tasks" / "ff_movie_sentiment.yaml").write_text(TASK.format(data=data))
    (work / "tasks" / "ff_movie_sentiment_gen.yaml").write_text(GEN_TASK.format(data=data))
    # lm-eval tokenizes the requests itself (then sends ids): the GGUF's tokenizer, saved as
    # transformers reads it.
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=FILE)
    tok.save_pretrained(work / "tokenizer")
    tasks = TaskManager(include_path=str(work / "tasks"))

    base = f"http://127.0.0.1:{a.port}"
    proc = subprocess.Popen([a.binary, "serve", "--model", f"{REPO}=text-generation", "--port",
                             str(a.port), "--threads", str(a.threads), "--quiet",
                             "--gguf-math", a.gguf_math], stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, proc)
        t = time.time()
        ours = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": REPO, "base_url": base + "/v1/completions",
                        "tokenizer": str(work / "tokenizer"), "tokenized_requests": True,
                        "num_concurrent": 1, "max_retries": 1},
            tasks=TASKS, task_manager=tasks, limit=a.limit, log_samples=True,
            batch_size=1)
        ours_s = time.time() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=FILE,
                                                 torch_dtype=torch.float32)
    t = time.time()
    ref = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=1),
        tasks=TASKS, task_manager=tasks, limit=a.limit, log_samples=True)
    ref_s = time.time() - t

    acc = lambda r: r["results"]["ff_movie_sentiment"]["acc,none"]  # noqa: E731
    em = lambda r: r["results"]["ff_movie_sentiment_gen"]["exact_match,first_word"]  # noqa: E731
    texts = lambda r: {s["doc_id"]: s["resps"][0][0]  # noqa: E731
                       for s in r["samples"]["ff_movie_sentiment_gen"]}
    go, gr = texts(ours), texts(ref)
    same_text = sum(go[d] == gr.get(d) for d in go)
    lo, lr = loglikelihoods(ours), loglikelihoods(ref)
    keys = sorted(set(lo) & set(lr))
    diffs = [abs(lo[k] - lr[k]) for k in keys]
    docs = sorted({k[0] for k in keys})
    pick = lambda ll, d: max(range(2), key=lambda i: ll[(d, i)])  # noqa: E731
    same = sum(pick(lo, d) == pick(lr, d) for d in docs)
    print(f"cpu {cpu_model()}  load {os.getloadavg()[0]:.2f}  threads {a.threads}")
    print(f"task ff_movie_sentiment (movie-review test sentences), {len(docs)} documents, "
          f"{len(keys)} log-likelihood requests")
    print("| engine | acc (log-likelihood) | exact_match (generated) | seconds, both tasks |")
    print("|---|---|---|---|")
    print(f"| ferroformers serve (GGUF math {a.gguf_math}), lm-eval local-completions | "
          f"{acc(ours):.4f} | {em(ours):.4f} | {ours_s:.1f} |")
    print(f"| transformers {__import__('transformers').__version__} f32, lm-eval hf | "
          f"{acc(ref):.4f} | {em(ref):.4f} | {ref_s:.1f} |")
    print(f"generated the same text for {same_text}/{len(go)} documents")
    for d in [d for d in sorted(go) if go[d] != gr.get(d)][:a.show]:
        print(f"  document {d}: ours {go[d]!r}, transformers {gr.get(d)!r}")
    print(f"same answer on {same}/{len(docs)} documents; |log-likelihood difference| median "
          f"{statistics.median(diffs):.4f}, max {max(diffs):.4f} (nats per continuation)")
    print(json.dumps({"ours_acc": acc(ours), "ref_acc": acc(ref), "same": same,
                      "ours_em": em(ours), "ref_em": em(ref), "same_text": same_text,
                      "docs": len(docs), "median_diff": statistics.median(diffs),
                      "max_diff": max(diffs)}))


if __name__ == "__main__":
    main()
