"""The Python API against transformers' own outputs (the committed parity fixtures), and the
behaviour a transformers user relies on: nesting of single and list calls, iterators, threads,
streaming, exceptions.

Run: pip install .[test] (from the repository root), then pytest crates/ferroformers-py/tests
"""
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ferroformers
from ferroformers import pipeline

ROOT = Path(__file__).resolve().parents[3]
FIX = ROOT / "tests" / "fixtures"
TOL = 1e-4

# (expected file, model folder) for every fixture family with pipeline cases.
FAMILIES = [
    (FIX / "expected", FIX / "models"),
    (FIX / "seq2seq" / "expected", FIX / "seq2seq" / "models"),
    (FIX / "decoders" / "expected", FIX / "decoders" / "models"),
]


def compare(ours, want, path="out"):
    """Same structure, equal strings and ints, floats within TOL (relative above 1)."""
    if isinstance(want, bool) or want is None or isinstance(want, str):
        assert ours == want, f"{path}: {ours!r} vs expected {want!r}"
    elif isinstance(want, (int, float)):
        assert isinstance(ours, (int, float)) and not isinstance(ours, bool), f"{path}: {ours!r} vs {want!r}"
        if isinstance(want, int) and not isinstance(want, bool) and isinstance(ours, int):
            assert ours == want, f"{path}: {ours} vs expected {want}"
        else:
            assert math.isclose(ours, want, rel_tol=0, abs_tol=TOL * max(1.0, abs(want))), f"{path}: {ours} vs expected {want}"
    elif isinstance(want, list):
        assert isinstance(ours, list), f"{path}: {type(ours).__name__} vs expected a list"
        assert len(ours) == len(want), f"{path}: length {len(ours)} vs expected {len(want)}"
        for i, (a, b) in enumerate(zip(ours, want)):
            compare(a, b, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours).__name__} vs expected a dict"
        assert sorted(ours) == sorted(want), f"{path}: keys {sorted(ours)} vs expected {sorted(want)}"
        for k in want:
            compare(ours[k], want[k], f"{path}.{k}")
    else:  # pragma: no cover
        raise AssertionError(f"{path}: unexpected expected value {want!r}")


def fixture_cases():
    for expected_dir, models_dir in FAMILIES:
        for f in sorted(expected_dir.glob("*.json")):
            exp = json.loads(f.read_text())
            for i, case in enumerate(exp.get("pipelines", [])):
                if "task" not in case:  # decoders: single text-generation calls
                    case = dict(case, task="text-generation", call="single", batch_size=None,
                                inputs=[case["inputs"]], outputs=[case["outputs"]])
                if case["task"] == "sentence-embeddings" and not (models_dir / f.stem).is_dir():
                    continue
                yield pytest.param(models_dir / f.stem, case, id=f"{f.stem}-{i}-{case['task']}")


# Fixture models transformers runs with a warning where we raise: model -> message.
REFUSED = {"bert-no-entailment": "entailment"}

_PIPES = {}


def cached_pipeline(task, model):
    key = (task, str(model))
    if key not in _PIPES:
        _PIPES[key] = pipeline(task, model=str(model))
    return _PIPES[key]


@pytest.mark.parametrize("model,case", list(fixture_cases()))
def test_fixture_case_matches_transformers(model, case):
    """Every recorded call, made the way the fixture script made it through
    `transformers.pipeline`, returns what transformers returned."""
    task, params = case["task"], dict(case["params"] or {})
    if model.name in REFUSED:
        # transformers warns and guesses; we refuse (the Rust parity tests check the same).
        with pytest.raises(OSError, match=REFUSED[model.name]):
            cached_pipeline(task, model)
        return
    pipe = cached_pipeline(task, model)
    if case["call"] == "single":
        ours = [pipe(x, **params) for x in case["inputs"]]
    else:
        if case["batch_size"] is not None:
            params["batch_size"] = case["batch_size"]
        ours = pipe(list(case["inputs"]), **params)
    want = case["outputs"]
    if task == "feature-extraction" and case["call"] == "list":
        # transformers returns a list call's hidden states at the batch's padded length; the
        # rows past an input's own tokens are padding. We return the input's own tokens only.
        want = [[rows[: len(o[0])]] for o, rows in zip(ours, (w[0] for w in want))]
    compare(ours, want)


def test_fixture_cases_cover_every_task():
    tasks = {p.values[1]["task"] for p in fixture_cases()}
    assert {
        "text-classification",
        "token-classification",
        "question-answering",
        "fill-mask",
        "feature-extraction",
        "sentence-embeddings",
        "zero-shot-classification",
        "text-generation",
        "text2text-generation",
        "summarization",
        "translation",
    } <= tasks


# -- call forms and nesting -------------------------------------------------------------------

SEQCLS = FIX / "models" / "bert-seqcls"
QA = FIX / "models" / "bert-qa"
LLAMA = FIX / "decoders" / "models" / "llama"


def test_single_and_list_nest_as_transformers():
    clf = cached_pipeline("text-classification", SEQCLS)
    one = clf("Hi")
    assert isinstance(one, list) and len(one) == 1 and set(one[0]) == {"label", "score"}
    many = clf(["Hi", "Hello there"])
    assert isinstance(many, list) and all(isinstance(x, dict) for x in many)
    top = clf("Hi", top_k=2)
    assert isinstance(top, list) and len(top) == 2 and all(isinstance(x, dict) for x in top)
    tops = clf(["Hi", "Hello"], top_k=2)
    assert all(isinstance(x, list) and len(x) == 2 for x in tops)


def test_question_answering_keyword_forms():
    qa = cached_pipeline("question-answering", QA)
    q, c = "Where is Hugging Face based?", "Hugging Face is based in New York City."
    by_dict = qa({"question": q, "context": c})
    by_kw = qa(question=q, context=c)
    assert by_dict == by_kw and set(by_kw) == {"score", "start", "end", "answer"}
    assert qa(question=[q, q], context=[c, c]) == [by_kw, by_kw]
    with pytest.raises(ValueError):
        qa(question=q)


def test_generators_give_iterators_in_order():
    clf = cached_pipeline("text-classification", SEQCLS)
    texts = [f"sentence number {i}" for i in range(40)]
    it = clf(t for t in texts)
    assert not isinstance(it, list)
    assert list(it) == [clf(t) for t in texts]


def test_return_tensors_gives_arrays():
    np = pytest.importorskip("numpy")
    fe = cached_pipeline("feature-extraction", FIX / "models" / "bert-base")
    nested = fe("Hello world")
    arr = fe("Hello world", return_tensors=True)
    assert isinstance(arr, np.ndarray) and arr.shape == (1, len(nested[0]), len(nested[0][0]))
    assert np.allclose(arr, np.asarray(nested, dtype=np.float32))


def test_array_tasks_without_numpy_fall_back_to_json(monkeypatch):
    """Array results cross as raw f32 buffers when numpy is there, as JSON otherwise: the same
    values either way (JSON's decimals are the f32 values rounded for printing)."""
    fe = cached_pipeline("feature-extraction", FIX / "models" / "bert-base")
    emb = cached_pipeline("sentence-embeddings", FIX / "models" / "minilm-st")
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
    with_numpy = (fe(texts), emb(texts))
    monkeypatch.setattr(ferroformers, "_numpy", lambda required: None)
    compare(list(with_numpy), [fe(texts), emb(texts)])
    vec = pytest.importorskip("numpy")
    monkeypatch.undo()
    arrays = emb(texts, return_tensors=True)
    assert [a.shape for a in arrays] == [(len(v),) for v in with_numpy[1]]
    assert all(isinstance(a, vec.ndarray) for a in arrays)


def test_continuous_batching_across_threads():
    """Calls from several threads share the batch and get what each gets alone."""
    prompts = ["The quick brown fox", "Hello", "Once upon a time there was", "A", "Numbers: 1 2 3"]
    alone = cached_pipeline("text-generation", LLAMA)
    want = [alone(p, max_new_tokens=5 + 2 * i, do_sample=False, return_full_text=False)
            for i, p in enumerate(prompts)]
    shared = pipeline("text-generation", model=str(LLAMA), continuous_batching=4096)
    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda ip: shared(ip[1], max_new_tokens=5 + 2 * ip[0], do_sample=False,
                                            return_full_text=False), enumerate(prompts)))
    assert got == want
    assert "".join(shared.stream("Hello", max_new_tokens=7, do_sample=False, return_full_text=False)) \
        == want[1][0]["generated_text"]
    with pytest.raises(ValueError, match="text-generation"):
        pipeline("text-classification", model=str(SEQCLS), continuous_batching=4096)
    with pytest.raises(ValueError, match="continuous_batching"):
        pipeline("text-generation", model=str(LLAMA), continuous_batching=0)


def test_text_generation_chat_and_stream():
    gen = cached_pipeline("text-generation", LLAMA)
    params = {"max_new_tokens": 6, "do_sample": False}
    whole = gen("The quick brown fox", return_full_text=False, **params)
    assert isinstance(whole, list) and set(whole[0]) == {"generated_text"}
    stream = gen.stream("The quick brown fox", return_full_text=False, **params)
    pieces = list(stream)
    assert "".join(pieces) == whole[0]["generated_text"]
    assert stream.output == whole
    # transformers' pattern: the call in a thread, a TextIteratorStreamer iterated here.
    streamer = ferroformers.TextIteratorStreamer(None, skip_prompt=True)
    done = {}
    t = threading.Thread(target=lambda: done.update(out=gen("The quick brown fox", streamer=streamer,
                                                              return_full_text=False, **params)))
    t.start()
    assert "".join(streamer) == whole[0]["generated_text"]
    t.join()
    assert done["out"] == whole
    with_prompt = ferroformers.TextIteratorStreamer()
    gen("The quick brown fox", streamer=with_prompt, **params)
    assert "".join(with_prompt) == gen("The quick brown fox", **params)[0]["generated_text"]
    # Malformed stream calls are errors, not panics.
    with pytest.raises(ValueError):
        gen.stream(["one", "two"])
    for bad in ("", "1, 2", "{"):
        with pytest.raises(ValueError, match="input"):
            gen._engine.stream(bad, "{}")
    # A list of prompts nests one list per prompt.
    two = gen(["The quick brown fox", "Hello"], **params)
    assert len(two) == 2 and all(isinstance(x, list) for x in two)


# -- threads --------------------------------------------------------------------------------


def test_threads_share_a_pipeline():
    clf = cached_pipeline("text-classification", SEQCLS)
    texts = [f"text {i} " * (1 + i % 7) for i in range(64)]
    want = [clf(t) for t in texts]
    with ThreadPoolExecutor(max_workers=4) as ex:
        got = list(ex.map(clf, texts))
    assert got == want


def test_the_gil_is_released_while_the_engine_runs():
    """A Python thread keeps running while the engine works: the longest pause it sees is
    far shorter than the engine call (with the GIL held it would span the whole call)."""
    fe = cached_pipeline("feature-extraction", FIX / "models" / "bert-base")
    # The engine call alone (the Python side's JSON work switches threads as any Python does).
    inputs = json.dumps(["The quick brown fox jumps over the lazy dog. " * 4] * 2000)
    gap = [0.0]
    stop = threading.Event()

    def tick():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gap[0] = max(gap[0], now - last)
            last = now

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.05)
    for _ in range(4):  # a call long enough to tell (release builds are fast)
        gap[0] = 0.0
        t0 = time.perf_counter()
        fe._engine.run(inputs, "{}")
        elapsed = time.perf_counter() - t0
        time.sleep(0.05)  # let the ticking thread record a pause that ended with the call
        if elapsed > 0.1:
            break
        inputs = json.dumps(json.loads(inputs) * 4)
    stop.set()
    t.join()
    assert elapsed > 0.1, f"the call took only {elapsed:.3f} s: make it longer"
    assert gap[0] < elapsed / 2, f"a {gap[0]:.3f} s pause during a {elapsed:.3f} s call"


# -- errors ---------------------------------------------------------------------------------


def test_errors_are_python_exceptions_with_the_cli_message():
    with pytest.raises(KeyError, match="unknown task `nope`"):
        pipeline("nope", model=str(SEQCLS))
    with pytest.raises(OSError, match="not found"):
        pipeline("text-classification", model="/nonexistent/model")
    clf = cached_pipeline("text-classification", SEQCLS)
    with pytest.raises(ValueError, match="empty"):
        clf("")
    with pytest.raises(ValueError, match="unknown parameter `bogus`"):
        clf("hi", bogus=1)
    with pytest.raises(ValueError, match="top_k"):
        clf("hi", top_k="three")
    with pytest.raises(ValueError, match="device"):
        pipeline("text-classification", model=str(SEQCLS), device="tpu")
    assert pipeline("text-classification", model=str(SEQCLS), device=-1).task == "text-classification"
    with pytest.raises(ValueError, match="batch_size"):
        pipeline("text-classification", model=str(SEQCLS), batch_size=0)
    # "auto" is the device's default: f32 on the CPU, the same scores as not asking.
    auto = pipeline("text-classification", model=str(SEQCLS), dtype="auto")
    assert auto("hi") == clf("hi")
    with pytest.raises(ValueError, match="auto"):
        pipeline("text-classification", model=str(SEQCLS), dtype="float8")
    with pytest.raises(ValueError):
        clf(12)


def test_cuda_needs_a_cuda_build():
    """device="cuda" / an ordinal: without the cuda feature, a ValueError naming it."""
    from ferroformers._ferroformers import built_with_cuda

    if built_with_cuda():
        pytest.skip("a CUDA build: the device is the GPU's (issue 16 runs it)")
    for d in ("cuda", 0, "cuda:1"):
        with pytest.raises(ValueError, match="cuda"):
            pipeline("text-classification", model=str(SEQCLS), device=d)


def test_missing_and_corrupt_files_are_os_errors(tmp_path):
    # The fixture folder with a corrupt weights file has no tokenizer either: that is named.
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        pipeline("text-classification", model=str(FIX / "models" / "corrupt"))
    for f in (SEQCLS).iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError):
        pipeline("text-classification", model=str(tmp_path))  # no weights
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="model.safetensors"):
        pipeline("text-classification", model=str(tmp_path))


def test_task_inferred_from_the_model():
    assert pipeline(model=str(SEQCLS)).task == "text-classification"
    assert pipeline(model=str(QA)).task == "question-answering"


def test_module_surface():
    assert ferroformers.__version__
    names = [t[0] for t in ferroformers.tasks()]
    assert "text-classification" in names and "question-answering" in names
    assert Path(ferroformers.download(str(SEQCLS))).is_dir()


def test_speech_recognition_matches_transformers():
    """Whisper through the Python API: a file path, and the same clip as a waveform dict with
    a numpy array, against transformers' pipeline outputs (tests/fixtures/whisper)."""
    np = pytest.importorskip("numpy")
    import wave

    root = FIX / "whisper"
    exp = json.loads((root / "expected" / "whisper-random.json").read_text())
    asr = pipeline("automatic-speech-recognition", model=str(root / "models" / "whisper-random"))
    checked = 0
    for case in exp["pipelines"]:
        if case["call"] != "single" or case["params"]:
            continue
        spec = case["inputs"][0]
        path = root / spec.get("path", spec.get("raw"))
        if "raw" in spec:
            with wave.open(str(path)) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            inp = {"raw": pcm.astype(np.float32) / 32768.0, "sampling_rate": spec["sampling_rate"]}
        else:
            inp = str(path)
        assert asr(inp) == case["output"]
        checked += 1
    assert checked >= 2
    with pytest.raises(ValueError, match="sampling_rate"):
        asr({"raw": np.zeros(16000, dtype=np.float32)})
