"""`ferroformers serve` driven by the clients people already use, unchanged: the `openai` SDK
and `huggingface_hub.InferenceClient` (versions pinned in pyproject.toml's `test` extra). Each
answer must parse into the client's types and equal what the Python package's pipeline gives
for the same model and input.

The server is the CLI binary: $FERROFORMERS_BIN, else target/debug/ferroformers or
target/release/ferroformers (`cargo build -p ferroformers-cli`; `cargo test --workspace`
builds the debug one). Without one these tests are skipped, unless
FERROFORMERS_REQUIRE_BIN=1 (scripts/test-python.sh sets it), which makes that a failure.
"""
import base64
import json
import math
import os
import struct
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ferroformers import pipeline

ROOT = Path(__file__).resolve().parents[3]
FIX = ROOT / "tests" / "fixtures"
LLAMA = FIX / "decoders" / "models" / "llama"
MINILM = FIX / "models" / "minilm-st"
SEQCLS = FIX / "models" / "bert-seqcls"
TOKCLS = FIX / "models" / "bert-tokcls"
MLM = FIX / "models" / "bert-mlm"
QA = FIX / "models" / "bert-qa"
NLI = FIX / "seq2seq" / "models" / "bart-nli"
T5 = FIX / "seq2seq" / "models" / "t5"
MARIAN = FIX / "seq2seq" / "models" / "marian"
TOL = 1e-4

openai = pytest.importorskip("openai")
hub = pytest.importorskip("huggingface_hub")


def binary():
    named = os.environ.get("FERROFORMERS_BIN")
    candidates = [Path(named)] if named else [ROOT / "target" / p / "ferroformers" for p in ("debug", "release")]
    for c in candidates:
        if c.is_file():
            return c
    msg = f"no ferroformers binary ({', '.join(map(str, candidates))}): cargo build -p ferroformers-cli"
    if os.environ.get("FERROFORMERS_REQUIRE_BIN") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One server with a model of every task the clients below call: its base URL."""
    port = free_port()
    models = [f"{LLAMA}=text-generation", str(MINILM), str(SEQCLS), f"{TOKCLS}=ner", str(MLM),
              str(QA), f"{NLI}=zero-shot-classification", f"{T5}=summarization",
              f"{MARIAN}=translation"]
    cmd = [str(binary()), "serve", "--port", str(port), "--quiet", "--threads", "2"]
    for m in models:
        cmd += ["--model", m]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stderr.read()}")
            try:
                if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("the server was not ready after 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def close(a, b):
    return math.isclose(a, b, rel_tol=0, abs_tol=TOL * max(1.0, abs(b)))


def generated(prompt, n):
    """The pipeline's greedy continuation of `prompt` (n new tokens)."""
    out = pipeline("text-generation", model=str(LLAMA))(
        prompt, max_new_tokens=n, do_sample=False, return_full_text=False)
    return out[0]["generated_text"]


def chat_text(n):
    """The pipeline's greedy answer to one user message `Hello` (n new tokens)."""
    out = pipeline("text-generation", model=str(LLAMA))(
        [{"role": "user", "content": "Hello"}], max_new_tokens=n, do_sample=False)
    return out[0]["generated_text"][-1]["content"]


# --- the openai SDK ---------------------------------------------------------------------------

def test_openai_chat_completions(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "Hello"}]
    r = c.chat.completions.create(model=str(LLAMA), messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == chat_text(8)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    chunks = list(c.chat.completions.create(model=str(LLAMA), messages=msgs, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    # A `developer` message (the SDK's system prompt for reasoning models) is a system message
    # to a template that does not name the role.
    r = c.chat.completions.create(
        model=str(LLAMA), max_tokens=6, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    want = pipeline("text-generation", model=str(LLAMA))(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_new_tokens=6, do_sample=False)
    assert r.choices[0].message.content == want[0]["generated_text"][-1]["content"]
    # Log-probabilities parse, and `n` choices come back.
    r = c.chat.completions.create(model=str(LLAMA), messages=msgs, max_tokens=3, temperature=0,
                                  logprobs=True, top_logprobs=2, n=2)
    assert len(r.choices) == 2
    lp = r.choices[0].logprobs.content
    assert len(lp) == 3 and len(lp[0].top_logprobs) == 2
    assert lp[0].logprob == pytest.approx(lp[0].top_logprobs[0].logprob)


def test_openai_completions_models_and_errors(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    r = c.completions.create(model=str(LLAMA), prompt="Hello", max_tokens=6, temperature=0)
    assert r.choices[0].text == generated("Hello", 6)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=str(LLAMA), prompt="Hello", max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    # `stop`: the text ends before the stop string, as OpenAI's (the pipeline keeps it).
    full = generated("Hello", 6)
    stop = full[2:4]
    r = c.completions.create(model=str(LLAMA), prompt="Hello", max_tokens=6, temperature=0,
                             stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    # The legacy `logprobs: N`.
    r = c.completions.create(model=str(LLAMA), prompt="Hello", max_tokens=6, temperature=0,
                             logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and "".join(lp.tokens) == r.choices[0].text
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    # A list of prompts: each prompt's choices in turn.
    r = c.completions.create(model=str(LLAMA), prompt=["Hello", "Once upon"], max_tokens=6,
                             temperature=0)
    assert [(ch.index, ch.text) for ch in r.choices] == \
        [(0, generated("Hello", 6)), (1, generated("Once upon", 6))]
    # `echo` (lm-evaluation-harness' log-likelihood requests): the prompt before the
    # completion, its first token unscored; with max_tokens 0 the prompt alone. (The fixture's
    # repetition penalty is lifted: it changes generated scores, not prompt scores.)
    plain = dict(model=str(LLAMA), prompt="Hello", max_tokens=4, temperature=0, logprobs=1,
                 extra_body={"repetition_penalty": 1.0})
    g = c.completions.create(**plain)
    e = c.completions.create(echo=True, **plain)
    assert e.choices[0].text == "Hello" + g.choices[0].text
    lp = e.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[-4:] == pytest.approx(g.choices[0].logprobs.token_logprobs, abs=TOL)
    assert all(lp.top_logprobs[i][t] == lp.token_logprobs[i] for i, t in enumerate(lp.tokens) if i)
    only = c.completions.create(**{**plain, "max_tokens": 0}, echo=True)
    assert only.choices[0].text == "Hello" and only.choices[0].finish_reason == "length"
    assert only.usage.completion_tokens == 0
    assert len(only.choices[0].logprobs.tokens) == only.usage.prompt_tokens
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:only.usage.prompt_tokens]
    # vLLM's `prompt_logprobs` (an extra field to the SDK): each prompt token's score and
    # rank, the first null, the same scores as `echo` gives.
    r = c.completions.create(model=str(LLAMA), prompt="Hello", max_tokens=1, temperature=0,
                             extra_body={"prompt_logprobs": 1})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == only.usage.prompt_tokens
    for entry, lp in zip(plp[1:], only.choices[0].logprobs.token_logprobs[1:]):
        assert any(abs(v["logprob"] - lp) <= TOL for v in entry.values()), entry
        assert all(v["rank"] >= 1 for v in entry.values()) and 1 <= len(entry) <= 2
    ids = [m.id for m in c.models.list()]
    assert str(LLAMA) in ids and str(MINILM) in ids
    # A field the server does not implement is refused by name, as the SDK's typed error.
    with pytest.raises(openai.UnprocessableEntityError, match="tools"):
        c.chat.completions.create(
            model=str(LLAMA), messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    # One generation model served: any name reaches it (as TGI and llama.cpp's server).
    r = c.completions.create(model="any-name", prompt="Hello", max_tokens=6, temperature=0)
    assert r.choices[0].text == generated("Hello", 6)


def test_openai_embeddings(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    texts = ["A quiet walk in the park.", "The market fell sharply."]
    want = pipeline("sentence-embeddings", model=str(MINILM))(texts, normalize=True)
    # Without `encoding_format` the SDK asks for base64 and decodes it itself; "float" asks
    # for numbers.
    for fmt in ({}, {"encoding_format": "float"}):
        r = c.embeddings.create(model=str(MINILM), input=texts, **fmt)
        assert [d.index for d in r.data] == [0, 1]
        for d, w in zip(r.data, want):
            assert len(d.embedding) == len(w)
            assert all(close(a, b) for a, b in zip(d.embedding, w)), fmt
        assert r.usage.prompt_tokens > 4
    # Token ids (the text's, special tokens included) embed as the text does.
    body = json.dumps({"inputs": texts[0], "model": str(MINILM)}).encode()
    req = urllib.request.Request(server + "/tokenize", data=body,
                                 headers={"Content-Type": "application/json"})
    ids = [t["id"] for t in json.load(urllib.request.urlopen(req))[0]]
    r = c.embeddings.create(model=str(MINILM), input=[ids], encoding_format="float")
    assert r.usage.prompt_tokens == len(ids)
    assert all(close(a, b) for a, b in zip(r.data[0].embedding, want[0]))
    # Asked for explicitly, base64 comes back as the string: little-endian f32s.
    r = c.embeddings.create(model=str(MINILM), input=texts, encoding_format="base64")
    raw = base64.b64decode(r.data[1].embedding)
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(floats) == len(want[1]) and all(close(a, b) for a, b in zip(floats, want[1]))


# --- huggingface_hub.InferenceClient ----------------------------------------------------------

def client(server, model):
    return hub.InferenceClient(model=f"{server}/models/{model}")


def test_inference_client_text_generation(server):
    g = hub.InferenceClient(base_url=server)
    want = generated("Hello", 6)
    # TGI's `POST /` answers with the prompt in front unless return_full_text is false.
    assert g.text_generation("Hello", max_new_tokens=6) == "Hello" + want
    d = g.text_generation("Hello", max_new_tokens=6, details=True, return_full_text=False)
    assert d.generated_text == want
    assert d.details.finish_reason == "length" and d.details.generated_tokens == 6
    assert len(d.details.tokens) == 6
    events = list(g.text_generation("Hello", max_new_tokens=6, stream=True, details=True))
    assert len(events) == 6 and events[-1].details.generated_tokens == 6
    assert "".join(e.token.text for e in events).endswith(events[-1].generated_text[-2:])
    # OpenAI's default temperature is 1 (sampling): 0 for the pipeline's greedy answer.
    out = g.chat_completion([{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0)
    assert out.choices[0].message.content == chat_text(5)
    parts = [c.choices[0].delta.content or "" for c in
             g.chat_completion([{"role": "user", "content": "Hello"}], max_tokens=5,
                               temperature=0, stream=True)
             if c.choices]
    assert "".join(parts) == out.choices[0].message.content


def test_inference_client_embeddings_and_similarity(server):
    np = pytest.importorskip("numpy")
    text = "A quiet walk in the park."
    emb = pipeline("sentence-embeddings", model=str(MINILM))
    got = client(server, MINILM).feature_extraction(text)
    assert np.allclose(np.asarray(got).reshape(-1), emb(text), atol=TOL)
    others = [text, "The market fell sharply."]
    scores = client(server, MINILM).sentence_similarity(text, other_sentences=others)
    v = [np.asarray(x) / np.linalg.norm(x) for x in emb([text] + others)]
    assert len(scores) == 2
    for s, o in zip(scores, v[1:]):
        assert close(s, float(v[0] @ o))


def test_inference_client_classification_tasks(server):
    text = "My name is Wolfgang and I live in Berlin"
    got = client(server, SEQCLS).text_classification(text)
    want = pipeline("text-classification", model=str(SEQCLS))(text)
    assert [(g.label, round(g.score, 4)) for g in got] == [(w["label"], round(w["score"], 4)) for w in want]

    got = client(server, TOKCLS).token_classification(text)
    want = pipeline("ner", model=str(TOKCLS))(text)
    assert [(g.word, g.start, g.end) for g in got] == [(w["word"], w["start"], w["end"]) for w in want]
    assert all(close(g.score, w["score"]) for g, w in zip(got, want))

    got = client(server, NLI).zero_shot_classification(text, ["people", "places", "food"])
    want = pipeline("zero-shot-classification", model=str(NLI))(
        text, candidate_labels=["people", "places", "food"])
    assert [g.label for g in got] == want["labels"]
    assert all(close(g.score, s) for g, s in zip(got, want["scores"]))


def test_inference_client_span_and_text_tasks(server):
    got = client(server, MLM).fill_mask("The capital of France is [MASK].")
    want = pipeline("fill-mask", model=str(MLM))("The capital of France is [MASK].")
    assert [(g.token, g.token_str, g.sequence) for g in got] == \
        [(w["token"], w["token_str"], w["sequence"]) for w in want]

    ctx = "My name is Wolfgang and I live in Berlin"
    got = client(server, QA).question_answering(question="Where do I live?", context=ctx)
    want = pipeline("question-answering", model=str(QA))(question="Where do I live?", context=ctx)
    assert (got.answer, got.start, got.end) == (want["answer"], want["start"], want["end"])
    assert close(got.score, want["score"])

    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    got = client(server, T5).summarization(text, generate_parameters={"max_new_tokens": 8})
    want = pipeline("summarization", model=str(T5))(text, max_new_tokens=8)
    assert got.summary_text == want[0]["summary_text"]

    got = client(server, MARIAN).translation("Hello world", generate_parameters={"max_new_tokens": 8})
    want = pipeline("translation", model=str(MARIAN))("Hello world", max_new_tokens=8)
    assert got.translation_text == want[0]["translation_text"]
