"""Grammar bitmasks are filled on the runner's mask thread while the forward runs, then applied
before sampling: the mask still decides every token, a failing fill ends only its own request,
and closing the engine stops the thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import torch

from kvloom import LLM, SamplingParams
from kvloom.structured.bitmask import fill_row_from_token_ids
from kvloom.structured.logits_processor import LogitsProcessor

ALLOWED = list(range(40, 400, 7))


class OnlyAllowed(LogitsProcessor):
    """A bitmask processor allowing ``ALLOWED``; records the thread each fill ran on."""

    uses_bitmask = True
    threads: ClassVar[list[str]] = []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        OnlyAllowed.threads.append(threading.current_thread().name)
        fill_row_from_token_ids(bitmask[row], ALLOWED)


class BrokenFill(LogitsProcessor):
    uses_bitmask = True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        raise RuntimeError("this grammar is broken")


def _mask_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kvloom-masks")]


def test_masks_are_filled_alongside_the_forward_and_still_decide_every_token(llama_dir: Path) -> None:
    OnlyAllowed.threads = []
    llm = LLM(llama_dir)
    masked = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logits_processors=[OnlyAllowed])
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    out = llm.generate([[5, 6, 7], [8, 9, 10, 11], [12, 13]], [masked, free, masked])
    assert all(t in ALLOWED for c in (out[0], out[2]) for t in c.token_ids)
    assert any(t not in ALLOWED for t in out[1].token_ids), "the unmasked row is not masked"
    assert len(OnlyAllowed.threads) == 24 and set(OnlyAllowed.threads) == {"kvloom-masks_0"}
    assert _mask_threads()
    llm.close()
    assert not _mask_threads(), "close() stops the mask thread"
    llm.core.assert_idle()


def test_a_fill_that_raises_on_the_mask_thread_ends_only_its_own_request(llama_dir: Path) -> None:
    llm = LLM(llama_dir)
    broken = SamplingParams(max_tokens=8, ignore_eos=True, logits_processors=[BrokenFill])
    fine = SamplingParams(max_tokens=8, ignore_eos=True, logits_processors=[OnlyAllowed])
    bad, good = llm.generate([[5, 6, 7], [8, 9, 10]], [broken, fine])
    assert bad.finish_reason == "error" and len(bad.token_ids) == 1
    assert good.finish_reason == "length" and all(t in ALLOWED for t in good.token_ids)
    llm.close()
    llm.core.assert_idle()
