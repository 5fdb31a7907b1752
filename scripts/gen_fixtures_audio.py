#!/usr/bin/env python
"""Audio parity fixtures: tests/fixtures/audio/ (files + expected.json).

Run with the pinned environment (scripts/requirements-fixtures.txt) and Debian's `ffmpeg`
(5.1.x, which is what transformers' `ffmpeg_read` shells out to):

    /work/venv/bench/bin/python scripts/gen_fixtures_audio.py

Deterministic and offline: signals come from a seeded numpy generator, WAV headers are written
here byte by byte, and ffmpeg encodes with `-fflags +bitexact` (no version strings, fixed Ogg
serial numbers). See tests/fixtures/audio/README.md for the schema.
"""

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import torch
import torchaudio
import transformers
from torchaudio import functional as F
from transformers import WhisperFeatureExtractor
from transformers.pipelines.audio_utils import ffmpeg_read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "audio")
HEAD = 2000  # samples stored verbatim at the start of every waveform


def f32(v):
    """A float32 value as the shortest decimal that round-trips (json then writes it verbatim)."""
    return float(str(np.float32(v)))


def f32_list(a):
    return [f32(v) for v in np.asarray(a, dtype=np.float32)]


def summary(x, head=HEAD, stride=None):
    """Length, the first `head` samples, every `stride`-th sample, and float64 sums of everything."""
    x = np.asarray(x, dtype=np.float32)
    out = {
        "len": int(x.shape[0]),
        "head": f32_list(x[:head]),
        "sum": float(x.astype(np.float64).sum()),
        "sumsq": float((x.astype(np.float64) ** 2).sum()),
    }
    if stride:
        out["stride"] = stride
        out["strided"] = f32_list(x[::stride])
    return out


# ---------------------------------------------------------------------------------------------
# Signals: a chirp, noise, and a stretch of digital silence (exercises Whisper's log floor).


def synth(rng, sr, n, f0, f1, amp):
    t = np.arange(n, dtype=np.float64) / sr
    dur = n / sr
    x = amp * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))
    x += 0.05 * rng.standard_normal(n)
    fade = min(n // 10, int(0.02 * sr))
    ramp = np.linspace(0.0, 1.0, fade)
    x[:fade] *= ramp
    x[n - fade :] *= ramp[::-1]
    x[int(0.40 * n) : int(0.55 * n)] = 0.0
    return np.clip(x, -1.0, 1.0)


def signal(rng, sr, n, channels):
    top = min(0.45 * sr, 6000.0)
    chans = [synth(rng, sr, n, 100.0, top, 0.6)]
    if channels == 2:
        chans.append(synth(rng, sr, n, 3000.0, 200.0, 0.4))
    return np.stack(chans, axis=1)  # [n][channels]


# ---------------------------------------------------------------------------------------------
# WAV writing (byte-exact; soundfile/libsndfile adds a timestamped PEAK chunk to float files).


def wav_bytes(frames, sr, kind, extensible=False):
    n, ch = frames.shape
    if kind == "u8":
        data = (np.round(frames * 127.0) + 128).astype(np.uint8).tobytes()
        bits, tag = 8, 1
    elif kind == "s16":
        data = np.round(frames * 32767.0).astype("<i2").tobytes()
        bits, tag = 16, 1
    elif kind == "s24":
        v = np.round(frames * (2**23 - 1)).astype("<i4").reshape(-1)
        data = b"".join(struct.pack("<i", int(s))[:3] for s in v)
        bits, tag = 24, 1
    elif kind == "s32":
        data = np.round(frames * (2**31 - 1)).astype(np.int64).astype("<i4").tobytes()
        bits, tag = 32, 1
    elif kind == "f32":
        data = frames.astype("<f4").tobytes()
        bits, tag = 32, 3
    else:
        raise ValueError(kind)
    align = ch * bits // 8
    if extensible:
        mask = {1: 0x4, 2: 0x3}[ch]
        guid = struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, ch, sr, sr * align, align, bits, 22, bits, mask) + guid
    else:
        fmt = struct.pack("<HHIIHH", tag, ch, sr, sr * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def ffmpeg(args, stdin=None):
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin"] + args
    return subprocess.run(cmd, input=stdin, capture_output=True, check=True).stdout


def encode(frames, sr, codec_args, fmt):
    """Encode float frames with ffmpeg from a raw f32 stream (bit-exact muxing)."""
    n, ch = frames.shape
    raw = frames.astype("<f4").tobytes()
    return ffmpeg(
        ["-f", "f32le", "-ar", str(sr), "-ac", str(ch), "-i", "pipe:0"]
        + codec_args
        + ["-fflags", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1", "-f", fmt, "pipe:1"],
        stdin=raw,
    )


def ffmpeg_mono(data, sr):
    """What `ffmpeg -i pipe:0 -ac 1 -ar SR -f f32le` returns (transformers' ffmpeg_read, any rate)."""
    return np.frombuffer(
        ffmpeg(["-i", "pipe:0", "-ac", "1", "-ar", str(sr), "-f", "f32le", "pipe:1"], stdin=data),
        np.float32,
    )


# ---------------------------------------------------------------------------------------------


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240611)
    torch.manual_seed(0)

    # name, rate, samples per channel, channels, how
    specs = [
        ("mono16k_s16.wav", 16000, 32000, 1, ("wav", "s16", False)),
        ("stereo44k_s16.wav", 44100, 33077, 2, ("wav", "s16", False)),
        ("mono8k_f32.wav", 8000, 12001, 1, ("wav", "f32", False)),
        ("mono22k_u8.wav", 22050, 11027, 1, ("wav", "u8", False)),
        ("stereo16k_s24.wav", 16000, 8001, 2, ("wav", "s24", True)),
        ("mono16k_s32.wav", 16000, 6001, 1, ("wav", "s32", False)),
        ("stereo48k.flac", 48000, 24007, 2, ("flac", None, False)),
        ("stereo44k.mp3", 44100, 88200, 2, ("mp3", None, False)),
        ("mono16k.ogg", 16000, 32000, 1, ("ogg", None, False)),
    ]
    files = []
    natives = {}
    for name, sr, n, ch, (container, kind, ext) in specs:
        frames = signal(rng, sr, n, ch)
        if container == "wav":
            data = wav_bytes(frames, sr, kind, ext)
        elif container == "flac":
            q = np.round(frames * 32767.0) / 32767.0  # 16-bit source, like a real FLAC rip
            data = encode(q, sr, ["-c:a", "flac", "-sample_fmt", "s16"], "flac")
        elif container == "mp3":
            data = encode(frames, sr, ["-c:a", "libmp3lame", "-b:a", "64k"], "mp3")
        else:
            data = encode(frames, sr, ["-c:a", "libvorbis", "-q:a", "2"], "ogg")
        with open(os.path.join(OUT, name), "wb") as fh:
            fh.write(data)

        native = ffmpeg_mono(data, sr)
        natives[name] = (native, sr)
        at16k = ffmpeg_read(data, 16000)
        entry = {"name": name, "sampling_rate": sr, "channels": ch, "ffmpeg_16k": summary(at16k)}
        if sr == 16000:
            # No resampling involved: ffmpeg_read's output *is* the native-rate mono waveform.
            assert np.array_equal(native, at16k), name
        else:
            entry["native"] = summary(native)
            y = F.resample(torch.from_numpy(native.copy()), sr, 16000).numpy()
            entry["torchaudio_16k"] = summary(y, head=1000)
        files.append(entry)

    # torchaudio.functional.resample on decoded waveforms (prefixes of odd lengths).
    resample_cases = [
        ("mono8k_f32.wav", 8001, 16000),
        ("mono8k_f32.wav", 12001, 16000),
        ("stereo44k_s16.wav", 33077, 16000),
        ("stereo44k_s16.wav", 441, 16000),
        ("stereo48k.flac", 4801, 16000),
        ("stereo48k.flac", 24007, 16000),
        ("mono22k_u8.wav", 11027, 16000),
        ("mono16k_s16.wav", 1601, 16000),
        ("mono16k_s16.wav", 1601, 8000),
        ("mono16k_s16.wav", 3203, 44100),
        ("mono16k_s16.wav", 7, 22050),
    ]
    resample = []
    for name, length, to in resample_cases:
        native, sr = natives[name]
        x = native[:length].copy()
        y = F.resample(torch.from_numpy(x), sr, to).numpy()
        resample.append({"source": name, "length": length, "from": sr, "to": to, "out": summary(y, 500, 31)})

    # WhisperFeatureExtractor, called as the pipeline does (torch available, padding to 30 s).
    base = natives["mono16k_s16.wav"][0]
    # name: (samples taken from the start, times repeated, frames stored)
    recipes = {
        "short": (800, 1, list(range(12)) + [2999]),
        "medium": (len(base), 1, list(range(0, 198, 3)) + list(range(198, 206))),
        "long": (len(base), 16, list(range(0, 3000, 50)) + [2999]),  # 32 s: truncated to 30 s
    }
    waves = {k: (np.tile(base[:take], rep), frames) for k, (take, rep, frames) in recipes.items()}
    features = []
    mel_filters = {}
    for feature_size in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=feature_size)
        mf = fe.mel_filters.astype(np.float32)  # [201][feature_size]; the torch path uses float32
        # Non-zero weights only, as [mel, frequency bin, weight], sorted by mel then bin.
        mel_filters[str(feature_size)] = sorted([int(m), int(k), f32(mf[k, m])] for k, m in np.argwhere(mf != 0))
        cases = [(name, wave, frames, "max_length") for name, (wave, frames) in waves.items()]
        # The pipeline's long-form call (Whisper input over 30 s, no chunk_length_s).
        cases.append(("long", waves["long"][0], list(range(0, 3200, 100)) + [3199], "longest"))
        for wave_name, wave, frames, padding in cases:
            if padding == "max_length":
                out = fe(wave, sampling_rate=16000, return_tensors="np")
            else:
                out = fe(wave, sampling_rate=16000, truncation=False, padding="longest", return_tensors="np")
            out = out["input_features"][0]
            assert out.shape == (feature_size, 3000 if padding == "max_length" else len(wave) // 160), out.shape
            features.append(
                {
                    "waveform": wave_name,
                    "padding": padding,
                    "feature_size": feature_size,
                    "shape": list(out.shape),
                    "frames": frames,
                    "values": [f32_list(row[frames]) for row in out],
                    "bin_sums": [float(s) for s in out.astype(np.float64).sum(axis=1)],
                    "sum": float(out.astype(np.float64).sum()),
                    "min": f32(out.min()),
                    "max": f32(out.max()),
                }
            )
        if feature_size == 128:
            fe.to_json_file(os.path.join(OUT, "preprocessor_config.json"))

    ffmpeg_version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    expected = {
        "generator": "scripts/gen_fixtures_audio.py",
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "torch": torch.__version__,
            "torchaudio": torchaudio.__version__,
            "transformers": transformers.__version__,
            "ffmpeg": ffmpeg_version,
        },
        "files": files,
        "resample": resample,
        "waveforms": {
            k: {"source": "mono16k_s16.wav", "take": take, "repeat": rep} for k, (take, rep, _) in recipes.items()
        },
        "mel_filters": mel_filters,
        "features": features,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as fh:
        json.dump(expected, fh, separators=(",", ":"))
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
