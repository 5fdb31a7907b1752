"""Type stubs for ferroformers: transformers' pipeline() on a Rust engine."""
from typing import Any, Iterable, Iterator, Optional, Union, overload

__version__: str

Device = Union[str, int, None]
Input = Union[str, dict[str, Any], list[dict[str, Any]]]

class Pipeline:
    """A loaded pipeline; call it as transformers' pipeline of the same task."""

    task: str
    batch_size: Optional[int]
    @overload
    def __call__(self, inputs: Union[str, dict[str, Any]], *args: Any, **kwargs: Any) -> Any: ...
    @overload
    def __call__(self, inputs: list[Any], *args: Any, **kwargs: Any) -> list[Any]: ...
    @overload
    def __call__(self, inputs: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[Any]: ...
    @overload
    def __call__(self, inputs: None = None, *args: Any, **kwargs: Any) -> Any: ...
    def stream(self, inputs: Input, **kwargs: Any) -> "Streamed":
        """Text generation piece by piece (the TextIteratorStreamer pattern)."""

class Streamed(Iterator[str]):
    def __next__(self) -> str: ...
    @property
    def output(self) -> Optional[list[dict[str, Any]]]:
        """The whole result, once the iteration has ended."""

class TextIteratorStreamer(Iterator[str]):
    """transformers' TextIteratorStreamer: pass as pipe(x, streamer=...), iterate elsewhere."""

    skip_prompt: bool
    timeout: Optional[float]
    def __init__(self, tokenizer: Any = None, skip_prompt: bool = False, timeout: Optional[float] = None,
                 **decode_kwargs: Any) -> None: ...
    def put_text(self, text: str) -> None: ...
    def end(self) -> None: ...
    def __next__(self) -> str: ...

def pipeline(
    task: Optional[str] = None,
    model: Optional[str] = None,
    tokenizer: Optional[str] = None,
    revision: Optional[str] = None,
    device: Device = None,
    dtype: Optional[Any] = None,
    batch_size: Optional[int] = None,
    *,
    torch_dtype: Optional[Any] = None,
    gguf_math: Optional[str] = None,
    quantize: Optional[str] = None,
    continuous_batching: Optional[int] = None,
    **kwargs: Any,
) -> Pipeline:
    """Build the pipeline for `task` on `model`, as transformers.pipeline does."""

def download(model: str, revision: Optional[str] = None) -> str:
    """Download a hub model into the Hugging Face cache (or find it); its local folder."""

def tasks() -> list[tuple[str, list[str], str]]:
    """Every task: (name, aliases, default model)."""
