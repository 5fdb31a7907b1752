"""ferroformers: Hugging Face Transformers pipelines on a Rust engine.

    from ferroformers import pipeline

    classifier = pipeline("sentiment-analysis")
    classifier("I love this!")          # [{'label': 'POSITIVE', 'score': 0.9998...}]

`pipeline()` takes transformers' arguments and returns an object called as transformers'
pipelines are: one input gives one result, a list gives a list, any other iterable (a
generator, a `datasets.Dataset` column) gives an iterator of results. Call-time keyword
arguments (`top_k`, `aggregation_strategy`, `max_new_tokens`, `candidate_labels`, ...) and the
nesting of the results follow transformers. The engine releases the GIL while it runs, so
threads may share one pipeline.
"""

import json
import queue
from itertools import islice

from ._ferroformers import Engine, __version__, download, tasks

__all__ = ["Pipeline", "TextIteratorStreamer", "pipeline", "download", "tasks", "__version__"]

# Tasks whose list calls flatten one-result lists to dicts (transformers' Text2TextGeneration
# family: `pipe(["a", "b"])` gives `[{...}, {...}]` when each input has one result).
_TEXT2TEXT = ("text2text-generation", "summarization", "translation")

# Tasks whose results are arrays: they cross from the engine as raw f32 buffers (numpy), not
# JSON, when numpy is installed.
_ARRAY_TASKS = ("feature-extraction", "sentence-embeddings")

# Keyword arguments transformers' pipelines accept that change nothing here.
_IGNORED = ("num_workers",)


def pipeline(
    task=None,
    model=None,
    tokenizer=None,
    revision=None,
    device=None,
    dtype=None,
    batch_size=None,
    *,
    torch_dtype=None,
    gguf_math=None,
    quantize=None,
    continuous_batching=None,
    **kwargs,
):
    """Build the pipeline for `task` (a name or alias such as "sentiment-analysis"; inferred
    from the model's files when `None`) on `model` (a local folder, a GGUF file or a hub id;
    the task's default model when `None`).

    device: "cpu", "cuda", "cuda:N", an ordinal or -1 (as transformers). dtype (or the older
    `torch_dtype`): "float32", "bfloat16", "float16" (as strings or `torch.` names) or "auto".
    Not given (or "auto"): float32 on the CPU, on a GPU the checkpoint's own (as
    `ferroformers run`). batch_size: inputs per forward pass (default 1 on the CPU, 32 on a
    GPU). gguf_math ("int8" or "exact") and quantize ("int8")
    are ferroformers' own options (see the README). continuous_batching (text-generation: a
    token budget, e.g. 32768): calls from several threads, one prompt each, share one forward
    pass per token, as `ferroformers serve` does. Other keyword arguments become default
    call parameters, as transformers' pipeline(..., **kwargs) makes them.
    """
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model: expected a folder, file or hub id as a string, got {type(model).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise TypeError(f"tokenizer: expected a folder or hub id as a string, got {type(tokenizer).__name__}")
    if dtype is None:
        dtype = torch_dtype
    if dtype is not None and not isinstance(dtype, str):
        dtype = str(dtype)  # torch.bfloat16 -> "torch.bfloat16"
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    for k in _IGNORED:
        kwargs.pop(k, None)
    engine = Engine(task, model, tokenizer, revision, device, dtype, batch_size, gguf_math, quantize,
                    continuous_batching)
    return Pipeline(engine, batch_size=batch_size, defaults=kwargs)


class Pipeline:
    """A loaded pipeline. Call it as transformers' pipeline of the same task."""

    def __init__(self, engine, batch_size=None, defaults=None):
        self._engine = engine
        self.task = engine.task
        self.batch_size = batch_size
        self._defaults = dict(defaults or {})

    def __repr__(self):
        return f"<ferroformers.Pipeline task={self.task!r}>"

    # -- calls ---------------------------------------------------------------------------

    def __call__(self, inputs=None, *args, **kwargs):
        for k in _IGNORED:
            kwargs.pop(k, None)
        streamer = kwargs.pop("streamer", None)
        inputs, kwargs = self._normalize_args(inputs, args, kwargs)
        if streamer is not None:
            return self._call_streaming(inputs, streamer, kwargs)
        params = dict(self._defaults)
        params.update(kwargs)
        return_tensors = bool(params.pop("return_tensors", False)) if self.task in _ARRAY_TASKS else False
        if self._is_single(inputs):
            out = self._run([inputs], params, return_tensors)[0]
            return self._single_shape(inputs, out, params, return_tensors)
        if isinstance(inputs, (list, tuple)):
            outs = self._run(list(inputs), params, return_tensors)
            return self._list_shape(inputs, outs, params, return_tensors)
        if hasattr(inputs, "__iter__"):
            return self._iterate(iter(inputs), params, return_tensors)
        raise ValueError(f"inputs: expected a string, a dict, a list or an iterable, got {type(inputs).__name__}")

    def stream(self, inputs, **kwargs):
        """Text generation, piece by piece: an iterator of the new text as it is generated
        (what transformers' `TextIteratorStreamer` yields). After the last piece, the
        iterator's `output` attribute holds the full result, as calling the pipeline returns
        it. Stopping the iteration early stops the generation after the current token."""
        params = dict(self._defaults)
        params.update(kwargs)
        if not self._is_single(inputs):
            raise ValueError("stream: one input at a time (a string or a chat)")
        return Streamed(self._engine.stream(json.dumps(_to_json_input(inputs)), json.dumps(params)))

    def _call_streaming(self, inputs, streamer, kwargs):
        """`pipe(x, streamer=TextIteratorStreamer(...))`: the pieces go to the streamer as
        they come, the call returns the whole result (transformers' pattern: the call runs in
        a thread while another iterates the streamer)."""
        if not hasattr(streamer, "put_text") or not hasattr(streamer, "end"):
            raise ValueError("streamer: expected a ferroformers.TextIteratorStreamer")
        try:
            if not getattr(streamer, "skip_prompt", False) and isinstance(inputs, str):
                streamer.put_text(inputs)
            stream = self.stream(inputs, **kwargs)
            for piece in stream:
                streamer.put_text(piece)
            return stream.output
        finally:
            streamer.end()

    # -- argument forms ------------------------------------------------------------------

    def _normalize_args(self, inputs, args, kwargs):
        """transformers' per-task call forms folded into (inputs, params)."""
        task = self.task
        if task == "question-answering":
            q, c = kwargs.pop("question", None), kwargs.pop("context", None)
            if inputs is None and q is not None and c is not None:
                if isinstance(q, str) and isinstance(c, str):
                    inputs = {"question": q, "context": c}
                elif isinstance(q, (list, tuple)) and isinstance(c, (list, tuple)):
                    if len(q) != len(c):
                        raise ValueError("question and context lists have different lengths")
                    inputs = [{"question": a, "context": b} for a, b in zip(q, c)]
                elif isinstance(q, (list, tuple)) and isinstance(c, str):
                    inputs = [{"question": a, "context": c} for a in q]
                else:
                    raise ValueError("question-answering: `question` and `context` must be strings or lists")
            elif inputs is None and (q is not None or c is not None):
                raise ValueError("question-answering needs both `question` and `context`")
            if args:
                raise ValueError("question-answering: pass inputs as dicts or question=, context=")
        elif task == "zero-shot-classification":
            if args:
                if len(args) > 1 or "candidate_labels" in kwargs:
                    raise ValueError("zero-shot-classification: candidate_labels given twice")
                kwargs["candidate_labels"] = args[0]
        elif task == "text-classification" and "text_pair" in kwargs:
            pair = kwargs.pop("text_pair")
            if isinstance(inputs, str) and isinstance(pair, str):
                inputs = {"text": inputs, "text_pair": pair}
            elif isinstance(inputs, (list, tuple)) and isinstance(pair, (list, tuple)) and len(inputs) == len(pair):
                inputs = [{"text": a, "text_pair": b} for a, b in zip(inputs, pair)]
            else:
                raise ValueError("text_pair: expected a string beside one text, or a list as long as the texts")
        elif args:
            raise TypeError(f"{task}: unexpected positional arguments {args!r}")
        if inputs is None:
            inputs = kwargs.pop("inputs", None) or kwargs.pop("text_inputs", None) or kwargs.pop("sequences", None)
        if inputs is None:
            raise ValueError(f"{task}: no inputs given")
        return inputs, kwargs

    def _is_single(self, inputs):
        if isinstance(inputs, (str, dict)):
            return True
        # A waveform (numpy array) is one audio input.
        if hasattr(inputs, "tolist") and getattr(inputs, "ndim", 0) == 1:
            return True
        # A chat: a list of {"role", "content"} messages is one input (a list of chats is many).
        if self.task == "text-generation" and isinstance(inputs, (list, tuple)) and inputs and all(
            isinstance(m, dict) and "role" in m for m in inputs
        ):
            return True
        return False

    # -- running and shaping -------------------------------------------------------------

    def _run(self, inputs, params, return_tensors=False):
        """The engine's per-input results: parsed JSON, or for array tasks numpy arrays
        (`return_tensors`) or their `tolist()` (each float the exact f32 value, as torch's
        `tolist()` gives it; JSON's decimal form would be the nearest double instead)."""
        if not inputs:
            return []
        encoded = json.dumps([_to_json_input(x) for x in inputs])
        if self.task in _ARRAY_TASKS:
            np = _numpy(required=return_tensors)
            if np is not None:
                arrays = [np.frombuffer(buf, dtype=np.float32).reshape(shape)
                          for buf, shape in self._engine.run_arrays(encoded, json.dumps(params))]
                return arrays if return_tensors else [a.tolist() for a in arrays]
        return json.loads(self._engine.run(encoded, json.dumps(params)))

    def _single_shape(self, inputs, out, params, return_tensors):
        if self.task == "text-classification" and isinstance(inputs, str) and "top_k" not in params:
            # transformers' legacy form: one text gives its top label in a list.
            return [out]
        return out

    def _list_shape(self, inputs, outs, params, return_tensors):
        if return_tensors:
            return outs
        if (
            self.task.startswith(_TEXT2TEXT)
            and all(isinstance(x, str) for x in inputs)
            and all(isinstance(o, list) and len(o) == 1 for o in outs)
        ):
            return [o[0] for o in outs]
        return outs

    def _iterate(self, it, params, return_tensors):
        chunk = max(self.batch_size or 1, int(params.get("batch_size") or 1)) * 16
        while True:
            items = list(islice(it, chunk))
            if not items:
                return
            for x, out in zip(items, self._run(items, params, return_tensors)):
                yield self._single_shape(x, out, params, return_tensors)


class Streamed:
    """`Pipeline.stream`'s iterator: text pieces; `output` once exhausted."""

    def __init__(self, stream):
        self._stream = stream

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._stream)

    @property
    def output(self):
        out = self._stream.output
        return None if out is None else json.loads(out)


class TextIteratorStreamer:
    """transformers' `TextIteratorStreamer` for ferroformers pipelines: pass it as
    `pipe(x, streamer=streamer)` in one thread and iterate it in another; it yields the text
    as it is generated. `tokenizer` is accepted for transformers' signature and not needed.
    With `skip_prompt=False` (transformers' default) a text prompt comes first, as transformers
    streams it; a chat's templated prompt is not repeated."""

    _END = object()

    def __init__(self, tokenizer=None, skip_prompt=False, timeout=None, **decode_kwargs):
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self._queue = queue.Queue()

    def put_text(self, text):
        self._queue.put(text)

    def end(self):
        self._queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get(timeout=self.timeout)
        if item is self._END:
            raise StopIteration
        return item


def _to_json_input(x):
    """One input as the engine reads it (the CLI's input line)."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        if "raw" in x or "array" in x:
            # An audio waveform {"raw" | "array": numpy array, "sampling_rate": N}.
            x = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in x.items()}
        return x
    if hasattr(x, "tolist") and getattr(x, "ndim", 0) == 1:
        # A bare waveform is taken to be at the feature extractor's 16 kHz, as transformers does.
        return {"raw": x.tolist(), "sampling_rate": 16000}
    if isinstance(x, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in x):
        return {"messages": list(x)}
    raise ValueError(f"input: expected a string, a dict or a waveform, got {type(x).__name__}")


def _numpy(required):
    """numpy if it is installed; `required` turns its absence into an ImportError."""
    try:
        import numpy
    except ImportError as e:  # pragma: no cover - depends on the environment
        if required:
            raise ImportError("return_tensors=True needs numpy (pip install numpy)") from e
        return None
    return numpy
