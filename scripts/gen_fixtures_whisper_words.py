"""Word-level timestamps (`return_timestamps="word"`) of the Whisper ASR pipeline on the tiny
random fixture models (tests/fixtures/whisper/models, made by gen_fixtures_whisper.py, which this
script never touches): writes tests/fixtures/whisper/words/expected.json.

Run: HF_HUB_OFFLINE=1 /work/venv/bench/bin/python scripts/gen_fixtures_whisper_words.py
(transformers 4.57.1, torch 2.9.1; a few seconds; deterministic).
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import pipeline

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "whisper"
OUT = FIX / "words" / "expected.json"

CASES = [
    ("mix_5.5s", {"return_timestamps": "word"}),  # the pipeline's default: 5 beams
    ("mix_5.5s", {"return_timestamps": "word", "generate_kwargs": {"num_beams": 1}}),
    ("chirp_2s", {"return_timestamps": "word", "generate_kwargs": {"num_beams": 1}}),
    ("chirp_2s", {"return_timestamps": "word", "generate_kwargs": {"num_beams": 2}}),
    ("tone_0.3s", {"return_timestamps": "word", "generate_kwargs": {"language": "en", "num_beams": 1}}),
    ("mix_5.5s", {"return_timestamps": "word", "return_language": True, "generate_kwargs": {"num_beams": 1}}),
    ("long_13s", {"return_timestamps": "word", "chunk_length_s": 5, "stride_length_s": 1,
                  "generate_kwargs": {"num_beams": 1}}),
    ("long_13s", {"return_timestamps": "word", "generate_kwargs": {"num_beams": 1}}),
]


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
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for model in ["whisper-random", "whisper-random-en"]:
        pipe = pipeline("automatic-speech-recognition", model=str(FIX / "models" / model), device="cpu")
        cases = []
        for clip, params in CASES:
            if model.endswith("-en") and ("return_language" in params or "language" in params.get("generate_kwargs", {})):
                continue
            path = FIX / "audio" / f"{clip}.wav"
            try:
                with torch.no_grad():
                    output = pipe(str(path), **params)
                entry = {"clip": f"audio/{clip}.wav", "params": params, "output": to_py(output)}
            except Exception as e:  # noqa: BLE001
                entry = {"clip": f"audio/{clip}.wav", "params": params, "error": f"{type(e).__name__}: {e}"}
            print(model, clip, params, "->", json.dumps(entry.get("output", entry.get("error")))[:300])
            cases.append(entry)
        out["models"][model] = cases
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
