#!/usr/bin/env python3
"""Speech recognition speed: real-time factor on ~a minute of speech, ours against
faster-whisper (CTranslate2, the same model.bin) and transformers (the same weights converted to
an HF folder), engines alternating, one process per engine and round.

    scripts/fetch-models.sh whisper-tiny-en
    /work/venv/bench/bin/python scripts/gen_whisper_real_refs.py --convert-only tiny.en   # HF copy
    cargo build --release -p ferroformers --example latency
    /work/venv/bench/bin/python scripts/bench_asr.py [--model tiny.en|base] [--beams 1,5] \\
        [--rounds 3] [--threads 2] [--engines ours,faster-whisper,faster-whisper-int8,transformers]

Every engine does the same job: tests/fixtures/whisper/speech-long.flac (50.6 s) decoded from the
file, Whisper's sequential long-form transcription with timestamps, temperature 0 (no fallback),
no conditioning on the previous window's text, no VAD, `num_beams`/`beam_size` as given. Each
process loads the model, runs the clip once to warm up (transformers: the short clip, to keep
its rounds short), then times one run. faster-whisper runs float32 (what ours and
transformers compute in); `faster-whisper-int8` is its int8 mode, the one most CPU users pick,
reported beside. Medians over rounds; the CPU model and load average are recorded.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import cpu_model  # noqa: E402

CLIP = ROOT / "tests" / "fixtures" / "whisper" / "speech-long.flac"
SHORT = ROOT / "tests" / "fixtures" / "whisper" / "speech.flac"
HUB = {"tiny.en": "Systran/faster-whisper-tiny.en", "base": "Systran/faster-whisper-base"}

FW = r"""
import json, sys, time
from faster_whisper import WhisperModel
path, clip, beams, threads, compute = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
m = WhisperModel(path, device="cpu", compute_type=compute, cpu_threads=threads, num_workers=1)
def run():
    segs, info = m.transcribe(clip, beam_size=beams, best_of=1, temperature=0.0,
                              condition_on_previous_text=False, vad_filter=False,
                              without_timestamps=False)
    return "".join(s.text for s in segs)
run()
t = time.perf_counter(); text = run(); s = time.perf_counter() - t
print(json.dumps({"seconds": s, "text": text}))
"""

HF = r"""
import json, sys, time, torch
from transformers import pipeline
path, clip, short, beams, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
p = pipeline("automatic-speech-recognition", model=path, device="cpu")
kw = dict(return_timestamps=True, generate_kwargs={"num_beams": beams})
p(short, **kw)
t = time.perf_counter(); out = p(clip, **kw); s = time.perf_counter() - t
print(json.dumps({"seconds": s, "text": out["text"]}))
"""


def snapshot(hub_id):
    sys.path.insert(0, str(ROOT / "scripts"))
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    ref = (repo / "refs" / "main").read_text().strip()
    return repo / "snapshots" / ref


def run(engine, model, beams, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    py = sys.executable
    if engine == "ours":
        exe = ROOT / "target" / "release" / "examples" / "latency"
        cmd = [exe, "automatic-speech-recognition", HUB[model], json.dumps(str(CLIP)), "--reps", "1",
               "--param", "return_timestamps=true", "--param", f'generate_kwargs={{"num_beams":{beams}}}']
    elif engine.startswith("faster-whisper"):
        compute = "int8" if engine.endswith("int8") else "float32"
        cmd = [py, "-c", FW, snapshot(HUB[model]), CLIP, str(beams), str(threads), compute]
    elif engine == "transformers":
        cmd = [py, "-c", HF, f"/tmp/whisper-hf/{model}", CLIP, SHORT, str(beams), str(threads)]
    else:
        sys.exit(f"unknown engine {engine}")
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{engine} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if engine == "ours":
        return out["median_ms"] / 1000.0, out.get("text") or "", wall
    return out["seconds"], out["text"], wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny.en", choices=sorted(HUB))
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="ours,faster-whisper,faster-whisper-int8,transformers")
    a = ap.parse_args()
    engines = a.engines.split(",")
    audio_s = 50.6
    load_before = os.getloadavg()
    results = {}
    texts = {}
    for beams in [int(b) for b in a.beams.split(",")]:
        for r in range(a.rounds):
            order = engines if r % 2 == 0 else list(reversed(engines))
            for e in order:
                s, text, _ = run(e, a.model, beams, a.threads)
                results.setdefault((e, beams), []).append(s)
                texts[(e, beams)] = text
                print(f"  round {r} beams {beams} {e}: {s:.2f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"\nWhisper {a.model}, {CLIP.name} ({audio_s} s), long-form with timestamps, "
          f"{a.threads} threads, median of {a.rounds}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"CPU {cpu_model()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print("| engine | beams | seconds | real-time factor | ours is faster by |")
    print("|---|---|---|---|---|")
    for beams in [int(b) for b in a.beams.split(",")]:
        ours = statistics.median(results[("ours", beams)]) if ("ours", beams) in results else None
        for e in engines:
            m = statistics.median(results[(e, beams)])
            ratio = f"{m / ours:.2f}x" if ours and e != "ours" else "-"
            print(f"| {e} | {beams} | {m:.2f} | {m / audio_s:.3f} | {ratio} |")
    print()
    for (e, beams), t in sorted(texts.items()):
        print(f"{e} beams {beams}: {t[:160]!r}")


if __name__ == "__main__":
    main()
