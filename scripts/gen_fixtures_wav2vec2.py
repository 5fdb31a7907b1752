#!/usr/bin/env python3
"""Generate the wav2vec2 (CTC automatic-speech-recognition) parity fixtures for ferroformers.

Rebuilt from scratch, offline and deterministically:

    tests/fixtures/wav2vec2/models/w2v-group/    tiny random Wav2Vec2ForCTC like wav2vec2-base-960h:
                                                 feat_extract_norm "group", post-LN encoder
                                                 (do_stable_layer_norm False), no attention mask
                                                 in its feature extractor config
    tests/fixtures/wav2vec2/models/w2v-stable/   like wav2vec2-large-960h-lv60-self: "layer"
                                                 norms in every conv layer, conv_bias, pre-LN
                                                 encoder, return_attention_mask True,
                                                 do_lower_case tokenizer
    tests/fixtures/wav2vec2/models/w2v-group-legacy/
                                                 w2v-group's weights as a pytorch_model.bin with
                                                 the old weight-norm names (weight_g/weight_v, as
                                                 the hub's wav2vec2-base-960h ships them)
    tests/fixtures/wav2vec2/expected/<model>.json reference outputs (schema: README.md there)
    tests/fixtures/wav2vec2/MANIFEST.json        versions, seeds, init, margins

Audio: the seeded 16 kHz clips of tests/fixtures/whisper/audio (made by gen_fixtures_whisper.py),
read as int16 / 32768.

    /work/venv/bench/bin/python scripts/gen_fixtures_wav2vec2.py

Needs transformers 4.57.1, torch 2.9.1 and numpy 2.4 (scripts/requirements-fixtures.txt); no
resampling, so no torchaudio.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
import wave  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    pipeline,
)

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "wav2vec2"
MODELS = FIX / "models"
EXPECTED = FIX / "expected"
AUDIO = ROOT / "tests" / "fixtures" / "whisper" / "audio"
SR = 16000

# wav2vec2-base-960h's vocabulary, in its order.
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L",
         "U", "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z"]

MODEL_SPECS = {
    "w2v-group": {
        "config": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4), conv_bias=False,
            feat_extract_norm="group", do_stable_layer_norm=False,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        ),
        "extractor": dict(return_attention_mask=False, do_normalize=True, padding_value=0.0),
        "tokenizer": dict(do_lower_case=False),
    },
    "w2v-stable": {
        "config": dict(
            hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48,
            conv_dim=(16, 16, 16), conv_kernel=(10, 5, 3), conv_stride=(5, 4, 3), conv_bias=True,
            feat_extract_norm="layer", do_stable_layer_norm=True,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        ),
        "extractor": dict(return_attention_mask=True, do_normalize=True, padding_value=0.0),
        "tokenizer": dict(do_lower_case=True),
    },
}

# Initialisation: HF's std-0.02 linear init makes every frame's logits nearly equal. These scales
# give input-dependent logits with blank (<pad>) winning most frames, as a trained CTC model does.
INIT = {
    "linear_std": 0.3,
    "bias_std": 0.05,
    "norm": "weight 1 + 0.1 N(0,1), bias 0.1 N(0,1) (LayerNorm and GroupNorm)",
    "lm_head_std": 1.0,
    "lm_head_bias": "0.1 N(0,1), -1.5 on <s> </s> <unk>, a bias on | that makes it beat the "
                    "letters in DELIM_FRACTION of mix_5.5s's frames, then one on <pad> that makes "
                    "it win BLANK_FRACTION of them (MANIFEST models.*.pad_bias)",
    "conv": "HF init (kaiming normal; pos conv N(0, 2 sqrt(1/(k*in))) under weight norm)",
}
BLANK_FRACTION = 0.6
DELIM_FRACTION = 0.15
GAP_MIN = 1e-4  # the smallest top-2 logit gap accepted over every frame the references compute
MAX_SEEDS = 12

CLIPS = ["tone_0.3s", "chirp_2s", "mix_5.5s", "long_13s"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def to_py(x):
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


def write_json(path, obj, pretty=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if pretty:
            json.dump(obj, f, ensure_ascii=False, indent=2, allow_nan=False)
        else:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        f.write("\n")


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_clip(name):
    with wave.open(str(AUDIO / f"{name}.wav"), "rb") as w:
        assert w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (pcm.astype(np.float32) / np.float32(32768.0)).astype(np.float32)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def init_weights(model, seed, calibration):
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            std = INIT["lm_head_std"] if name == "lm_head" else INIT["linear_std"]
            normal(mod.weight, std)
            if mod.bias is not None:
                normal(mod.bias, 0.1 if name == "lm_head" else INIT["bias_std"])
        elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            normal(mod.weight, 0.1, 1.0)
            normal(mod.bias, 0.1)
    with torch.no_grad():
        b = model.lm_head.bias
        for t in ["<s>", "</s>", "<unk>"]:
            b[VOCAB.index(t)] -= 1.5
        x = torch.from_numpy(calibration)[None]
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        lg = model(x).logits[0]
        pad, delim = VOCAB.index("<pad>"), VOCAB.index("|")
        # "|" first: the best of the letters beats it in all but DELIM_FRACTION of the frames
        letters = lg[:, delim + 1:].max(1).values
        delim_bias = round(float(torch.quantile(letters - lg[:, delim], DELIM_FRACTION)), 2)
        b[delim] += delim_bias
        lg[:, delim] += delim_bias
        others = lg[:, pad + 1:].max(1).values
        pad_bias = round(float(torch.quantile(others - lg[:, pad], BLANK_FRACTION)), 2)
        b[pad] += pad_bias
    return {"pad": pad_bias, "|": delim_bias}


def build_model(name, spec, seed, calibration):
    out = MODELS / name
    cfg = Wav2Vec2Config(
        vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        hidden_act="gelu", feat_extract_activation="gelu",
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
        architectures=["Wav2Vec2ForCTC"], **spec["config"],
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(cfg).eval()
    pad_bias = init_weights(model, seed, calibration)
    model.save_pretrained(out, safe_serialization=True)
    work = Path("/tmp/ferro-w2v-vocab")
    work.mkdir(parents=True, exist_ok=True)
    vocab_file = work / f"{name}-vocab.json"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    tok = Wav2Vec2CTCTokenizer(str(vocab_file), word_delimiter_token="|", **spec["tokenizer"])
    tok.save_pretrained(out)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, **spec["extractor"])
    fe.save_pretrained(out)
    return out, pad_bias


def build_legacy(src, dst):
    """`src`'s weights as the hub's old checkpoints store them: pytorch_model.bin, weight_g/v."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    from safetensors.torch import load_file

    sd = load_file(src / "model.safetensors")
    renamed = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        renamed[k] = v.contiguous()
    assert any(k.endswith("weight_g") for k in renamed), "no weight-norm tensors renamed"
    torch.save(renamed, dst / "pytorch_model.bin")
    return sorted(k for k in renamed if "pos_conv" in k)


# ----------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------


def values_summary(x):
    x = np.asarray(x, dtype=np.float32)
    return {
        "len": int(x.shape[0]),
        "first8": x[:8],
        "last8": x[-8:],
        "every101": x[::101],
        "sum": float(x.astype(np.float64).sum()),
        "sum_sq": float((x.astype(np.float64) ** 2).sum()),
    }


def feature_refs(fe, clips):
    single = []
    for name in ["tone_0.3s", "chirp_2s", "mix_5.5s"]:
        out = fe(clips[name], sampling_rate=SR)
        single.append({"clip": name, **values_summary(out["input_values"][0])})
    batches = []
    for ram in [True, False]:
        names = ["tone_0.3s", "chirp_2s"]
        out = fe([clips[n] for n in names], sampling_rate=SR, padding=True,
                 return_attention_mask=ram, return_tensors="np")
        rows = [values_summary(r) for r in out["input_values"]]
        case = {"clips": names, "return_attention_mask": ram, "rows": rows}
        if ram:
            case["attention_mask_sums"] = out["attention_mask"].sum(-1)
        batches.append(case)
    try:
        fe(clips["tone_0.3s"], sampling_rate=8000)
        raise AssertionError("no sampling-rate error")
    except ValueError as e:
        rate_error = str(e)
    return single, batches, rate_error


def logits_summary(logits, argmax_limit=400):
    lg = logits.detach().float()
    b, t, v = lg.shape
    rows = {}
    for bi in range(b):
        for ti in sorted({0, 1, 2, t // 2, t - 2, t - 1}):
            if 0 <= ti < t:
                rows[f"{bi},{ti}"] = lg[bi, ti]
    out = {
        "shape": [b, t, v],
        "rows": rows,
        "vocab_sums": lg.double().sum(1),
        "frame_sums_every7": lg.double().sum(2)[:, ::7],
    }
    if t <= argmax_limit:
        out["argmax"] = lg.argmax(-1)
    return out


def logits_refs(model, fe, clips):
    cases = []
    # one clip, mask as the pipeline gives it (all ones), and the same without a mask
    for name in ["tone_0.3s", "chirp_2s"]:
        x = fe(clips[name], sampling_rate=SR, return_attention_mask=True, return_tensors="pt")
        with torch.no_grad():
            lg = model(x["input_values"], attention_mask=x["attention_mask"]).logits
            lg2 = model(x["input_values"]).logits
        assert torch.equal(lg, lg2) or (lg - lg2).abs().max() < 1e-6
        cases.append({"name": f"single/{name}", "clips": [name], "mask": True, **logits_summary(lg)})
    # a padded batch with the mask (what pipeline batching feeds the model), and without it
    names = ["tone_0.3s", "chirp_2s"]
    short = [clips[n][: 16000 if n == "chirp_2s" else None] for n in names]
    for use_mask in [True, False]:
        x = fe(short, sampling_rate=SR, padding=True, return_attention_mask=True,
               return_tensors="pt")
        with torch.no_grad():
            lg = model(x["input_values"],
                       attention_mask=x["attention_mask"] if use_mask else None).logits
        cases.append({
            "name": f"batch/mask={use_mask}", "clips": names, "truncate": [None, 16000],
            "mask": use_mask, "normalize_padding": True, **logits_summary(lg),
        })
    return cases


def pipeline_cases(kind):
    """(name, inputs, kwargs); an input is (clip, declared sampling rate).

    Every input is at 16 kHz: transformers 4.57.1 never resamples a `{"raw", "sampling_rate"}`
    input (it calls `F.resample(x, sr, sr, 16000)`, fixed upstream in #41298), where ferroformers
    does, so other rates would not compare.
    """
    one = lambda c, sr=SR: [(c, sr)]  # noqa: E731
    cases = [
        ("text/tone", one("tone_0.3s"), {}),
        ("text/chirp", one("chirp_2s"), {}),
        ("text/mix", one("mix_5.5s"), {}),
        ("char/tone", one("tone_0.3s"), {"return_timestamps": "char"}),
        ("char/chirp", one("chirp_2s"), {"return_timestamps": "char"}),
        ("word/chirp", one("chirp_2s"), {"return_timestamps": "word"}),
        ("word/mix", one("mix_5.5s"), {"return_timestamps": "word"}),
        ("chunk/long", one("long_13s"), {"chunk_length_s": 2.0, "stride_length_s": [0.5, 0.3]}),
        ("chunk/mix-default-stride", one("mix_5.5s"), {"chunk_length_s": 1.0}),
        ("chunk/mix-word", one("mix_5.5s"),
         {"chunk_length_s": 1.5, "stride_length_s": 0.25, "return_timestamps": "word"}),
        ("chunk/chirp-char", one("chirp_2s"),
         {"chunk_length_s": 0.7, "stride_length_s": 0.1, "return_timestamps": "char"}),
        ("batch/3", [("tone_0.3s", SR), ("chirp_2s", SR), ("mix_5.5s", SR)], {"batch_size": 2}),
        ("batch/3-word", [("chirp_2s", SR), ("tone_0.3s", SR), ("mix_5.5s", SR)],
         {"batch_size": 3, "return_timestamps": "word"}),
        ("batch/chunked", [("long_13s", SR), ("chirp_2s", SR)],
         {"batch_size": 4, "chunk_length_s": 2.0, "stride_length_s": 0.4}),
    ]
    return cases


def pipeline_refs(pipe, clips, kind):
    out = []
    for name, inputs, kwargs in pipeline_cases(kind):
        kw = dict(kwargs)
        items = [{"raw": clips[c].copy(), "sampling_rate": sr} for c, sr in inputs]
        res = pipe(items, **kw) if len(items) > 1 else [pipe(items[0], **kw)]
        out.append({
            "name": name,
            "inputs": [{"clip": c, "sampling_rate": sr} for c, sr in inputs],
            "params": {k: v for k, v in kwargs.items() if k != "batch_size"},
            "batch_size": kwargs.get("batch_size", 1),
            "outputs": res,
        })
    return out


def error_refs(pipe, clips):
    errors = {}
    try:
        pipe({"raw": clips["tone_0.3s"].copy(), "sampling_rate": SR}, return_timestamps=True)
        raise AssertionError("return_timestamps=True accepted")
    except ValueError as e:
        errors["return_timestamps_true"] = str(e)
    return errors


def top2_gap(logits):
    top = logits.detach().float().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def make(name, spec, seed, clips):
    out, pad_bias = build_model(name, spec, seed, clips["mix_5.5s"])
    model = Wav2Vec2ForCTC.from_pretrained(out).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(out)
    pipe = pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    gaps, blanks = [], [0, 0]

    def hook(_m, _i, o):
        gaps.append(top2_gap(o))
        am = o.argmax(-1)
        blanks[0] += int((am == 0).sum())
        blanks[1] += am.numel()

    handles = [m.lm_head.register_forward_hook(hook) for m in (model, pipe.model)]
    feats, feat_batches, rate_error = feature_refs(fe, clips)
    logits = logits_refs(model, fe, clips)
    pipes = pipeline_refs(pipe, clips, name)
    errors = error_refs(pipe, clips)
    errors["sampling_rate"] = rate_error
    for h in handles:
        h.remove()
    ref = {
        "model": name,
        "inputs_to_logits_ratio": model.config.inputs_to_logits_ratio,
        "clips": [{"name": c, "path": f"../whisper/audio/{c}.wav", "samples": len(clips[c])}
                  for c in CLIPS],
        "features": feats,
        "features_batch": feat_batches,
        "logits": logits,
        "pipeline": pipes,
        "errors": errors,
        "min_top2_gap": min(gaps),
        "blank_fraction": blanks[0] / max(blanks[1], 1),
    }
    ref["pad_bias"] = pad_bias
    ref["frames"] = blanks[1]
    return out, model, ref


def main():
    for d in [MODELS, EXPECTED]:
        if d.exists():
            shutil.rmtree(d)
    clips = {c: read_clip(c) for c in CLIPS}
    manifest = {
        "generator": "scripts/gen_fixtures_wav2vec2.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "numpy": np.__version__},
        "clips": {c: sha256_file(AUDIO / f"{c}.wav") for c in CLIPS},
        "init": {**INIT, "blank_fraction": BLANK_FRACTION, "delim_fraction": DELIM_FRACTION},
        "gap_min": GAP_MIN,
        "models": {},
    }
    for name, spec in MODEL_SPECS.items():
        base = zlib.crc32(name.encode()) & 0x7FFFFFFF
        tried = []
        for i in range(MAX_SEEDS):
            seed = base + i
            out, model, ref = make(name, spec, seed, clips)
            tried.append({"seed": seed, "min_top2_gap": ref["min_top2_gap"]})
            log(f"{name} seed {seed}: min gap {ref['min_top2_gap']:.2e}, "
                f"blank {ref['blank_fraction']:.2f}")
            if ref["min_top2_gap"] >= GAP_MIN:
                break
            shutil.rmtree(out)
        else:
            raise SystemExit(f"{name}: no seed with a top-2 gap >= {GAP_MIN}")
        write_json(EXPECTED / f"{name}.json", to_py(ref))
        manifest["models"][name] = {
            "seed": seed, "seeds_tried": tried, "min_top2_gap": ref["min_top2_gap"],
            "blank_fraction": ref.pop("blank_fraction"), "pad_bias": ref.pop("pad_bias"),
            "frames": ref.pop("frames"), "config": spec,
            "files": sorted(p.name for p in out.iterdir()),
        }
        if name == "w2v-group":
            legacy = MODELS / "w2v-group-legacy"
            names = build_legacy(out, legacy)
            m2 = Wav2Vec2ForCTC.from_pretrained(legacy).eval()
            x = torch.from_numpy(clips["chirp_2s"])[None]
            with torch.no_grad():
                assert torch.equal(model(x).logits, m2(x).logits), "legacy weights differ"
            manifest["models"]["w2v-group-legacy"] = {
                "from": "w2v-group", "weight_norm_names": names,
                "files": sorted(p.name for p in legacy.iterdir()),
            }
    write_json(FIX / "MANIFEST.json", to_py(manifest), pretty=True)
    log("done")


if __name__ == "__main__":
    main()
