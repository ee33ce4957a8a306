"""The progress bar of ``LLM.generate`` / ``LLM.chat``: requests done and output tokens/s.

``use_tqdm=None`` (auto) shows it only when stderr is a terminal, so scripts piped to a file,
test runs and notebooks' captured cells stay clean; ``True`` forces it on, ``False`` off.
Off means no output at all and no tqdm import (tqdm is imported only when a bar is drawn).

``import_tqdm_auto_quietly`` keeps other libraries' bars from warning in Jupyter (see there).
"""

from __future__ import annotations

import sys
import time
import warnings
from types import TracebackType
from typing import Any, TextIO

REDRAW_S = 0.5
"""While no request finishes, the tokens/s figure is still redrawn this often (seconds)."""


def wants_bar(use_tqdm: bool | None, stream: TextIO | None) -> bool:
    """Whether a bar is drawn: ``use_tqdm`` if given, else whether ``stream`` is a terminal."""
    if use_tqdm is not None:
        return use_tqdm
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def import_tqdm_auto_quietly() -> None:
    """Import ``tqdm.auto`` without its "IProgress not found" warning; call it before importing
    transformers or huggingface_hub, which import ``tqdm.auto`` at their own import.

    In a Jupyter kernel without ipywidgets, the first import of ``tqdm.auto`` warns (a
    ``TqdmWarning``) and falls back to the plain ``tqdm.std`` bar. Importing it here first, with
    that one warning ignored for the length of the import, gives the same plain bar silently;
    later imports find it in ``sys.modules`` and never warn. No filter outlives the call
    (``warnings.catch_warnings`` restores the process-wide list, so the import is kept short).
    Anywhere else (a terminal, a notebook with ipywidgets) the import behaves as usual.
    """
    if "tqdm.autonotebook" in sys.modules:
        return
    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        import tqdm.auto  # noqa: F401


class BatchProgress:
    """Counts one batch's finished requests and generated tokens; draws them if ``enabled``.

    Invariant: ``num_done <= total``; with ``enabled=False`` nothing is ever written and tqdm
    is never imported. Use it as a context manager so the bar is closed on errors too.
    """

    def __init__(self, total: int, *, enabled: bool, stream: TextIO | None = None,
                 desc: str = "Processed prompts") -> None:
        self.total = total
        self.num_done = 0
        self.num_output_tokens = 0
        self._start = self._last_draw = time.perf_counter()
        self._bar: Any = None  # a tqdm bar (tqdm ships no type hints)
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="req", file=stream if stream is not None else sys.stderr,
                             dynamic_ncols=True, postfix="output: 0.0 tok/s")

    def update(self, num_finished: int, num_new_tokens: int) -> None:
        """Record one engine step: ``num_finished`` requests ended, ``num_new_tokens`` were sampled."""
        self.num_done += num_finished
        self.num_output_tokens += num_new_tokens
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"output: {self.output_tokens_per_s():.1f} tok/s", refresh=False)
        if num_finished:
            self._bar.update(num_finished)
            self._last_draw = time.perf_counter()
        elif time.perf_counter() - self._last_draw >= REDRAW_S:  # requests of one length all end together
            self._bar.refresh()
            self._last_draw = time.perf_counter()

    def output_tokens_per_s(self) -> float:
        """Generated tokens per second since the batch started."""
        elapsed = time.perf_counter() - self._start
        return self.num_output_tokens / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
