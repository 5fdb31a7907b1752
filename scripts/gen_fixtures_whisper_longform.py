"""Whisper's long-form options in the ASR pipeline on the tiny random fixture models
(tests/fixtures/whisper/models, made by gen_fixtures_whisper.py, which this script never
touches): `prompt_ids` (both `prompt_condition_type`s), `condition_on_prev_tokens`, and the
temperature fallback's thresholds where the outcome is deterministic (every try greedy, or no
fallback needed, or a window skipped as silence). Writes tests/fixtures/whisper/longform/expected.json.

Run: HF_HUB_OFFLINE=1 /work/venv/bench/bin/python scripts/gen_fixtures_whisper_longform.py
(transformers 4.57.1, torch 2.9.1; ffmpeg on PATH for the pipeline's file decoding; a minute;
deterministic).
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import pipeline

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "whisper"
OUT = FIX / "longform" / "expected.json"
PROMPT = "hello world"
LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)

G = {"num_beams": 1}
CASES = [
    # prompt_ids, short-form (one window), with and without timestamps, greedy and beams
    ("mix_5.5s", {"generate_kwargs": {**G, "prompt_ids": "P"}}),
    ("mix_5.5s", {"generate_kwargs": {"num_beams": 2, "prompt_ids": "P"}}),
    ("mix_5.5s", {"return_timestamps": True, "generate_kwargs": {**G, "prompt_ids": "P"}}),
    ("chirp_2s", {"generate_kwargs": {**G, "prompt_ids": "LONG"}}),
    # long-form: previous text, prompt, both
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "condition_on_prev_tokens": True}}),
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "prompt_ids": "P"}}),
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "prompt_ids": "P",
                                                                 "condition_on_prev_tokens": True}}),
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "prompt_ids": "P",
                                                                 "condition_on_prev_tokens": True,
                                                                 "prompt_condition_type": "all-segments"}}),
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {"num_beams": 2, "condition_on_prev_tokens": True}}),
    ("long_13s", {"return_timestamps": "word", "generate_kwargs": {**G, "prompt_ids": "P",
                                                                   "condition_on_prev_tokens": True}}),
    # fallback thresholds with only greedy tries (deterministic whatever they decide)
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "temperature": [0.0, 0.0],
                                                                 "compression_ratio_threshold": 1.35,
                                                                 "logprob_threshold": -1.0,
                                                                 "condition_on_prev_tokens": True}}),
    # no-speech skipping: thresholds that skip, and ones that do not
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "temperature": [0.0],
                                                                 "logprob_threshold": 0.0,
                                                                 "no_speech_threshold": 0.0}}),
    ("long_13s", {"return_timestamps": True, "generate_kwargs": {**G, "temperature": [0.0],
                                                                 "logprob_threshold": -100.0,
                                                                 "no_speech_threshold": 0.0}}),
    ("mix_5.5s", {"generate_kwargs": {**G, "temperature": [0.0], "logprob_threshold": 0.0,
                                      "no_speech_threshold": 0.0}}),
    ("mix_5.5s", {"generate_kwargs": {"num_beams": 2, "temperature": [0.0], "logprob_threshold": 0.0,
                                      "no_speech_threshold": 1.0}}),
]
# Threshold sweeps that pin each window's average log-probability (a window is skipped when it
# is below `logprob_threshold` and the no-speech probability is above 0) and its no-speech
# probability (skipped when above `no_speech_threshold`, every log-probability being below 0).
for clip, ts in [("mix_5.5s", False), ("long_13s", True)]:
    for beams in [1, 2]:
        for lp in [-2.5, -2.0, -1.8, -1.6, -1.5, -1.4, -1.3, -1.2, -1.1, -1.0, -0.5]:
            CASES.append((clip, {"return_timestamps": ts, "generate_kwargs": {
                "num_beams": beams, "temperature": [0.0], "logprob_threshold": lp, "no_speech_threshold": 0.0}}))
    for ns in [1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-4]:
        CASES.append((clip, {"return_timestamps": ts, "generate_kwargs": {
            **G, "temperature": [0.0], "logprob_threshold": 0.0, "no_speech_threshold": ns}}))


def to_py(x):
    if isinstance(x, dict):
        return {k: to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_py(v) for v in x]
    if isinstance(x, torch.Tensor):
        return to_py(x.tolist())
    return x


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "prompts": {"P": PROMPT, "LONG": LONG_PROMPT}, "models": {}}
    for model in ["whisper-random", "whisper-random-en"]:
        pipe = pipeline("automatic-speech-recognition", model=str(FIX / "models" / model), device="cpu")
        ids = {k: pipe.tokenizer.get_prompt_ids(v).tolist() for k, v in out["prompts"].items()}
        cases = []
        for clip, params in CASES:
            gk = dict(params.get("generate_kwargs", {}))
            if "prompt_ids" in gk:
                gk["prompt_ids"] = ids[gk["prompt_ids"]]
            stored = {**params, "generate_kwargs": gk}
            run = {**params, "generate_kwargs": {
                k: (torch.tensor(v) if k == "prompt_ids" else tuple(v) if k == "temperature" else v)
                for k, v in gk.items()}}
            path = FIX / "audio" / f"{clip}.wav"
            try:
                with torch.no_grad():
                    output = pipe(str(path), **run)
                entry = {"clip": f"audio/{clip}.wav", "params": stored, "output": to_py(output)}
            except Exception as e:  # noqa: BLE001
                entry = {"clip": f"audio/{clip}.wav", "params": stored, "error": f"{type(e).__name__}: {e}"}
            print(model, clip, json.dumps(params)[:160], "->", json.dumps(entry.get("output", entry.get("error")))[:200])
            cases.append(entry)
        out["models"][model] = cases
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
