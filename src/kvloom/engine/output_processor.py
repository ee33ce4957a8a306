"""Frontend bookkeeping of outputs: detokenize, apply stop strings, gather ``n`` choices.

Each user request (the parent) has ``n`` sequences, one core request each, with ids
``"{parent_id}"`` for ``n == 1`` or ``"{parent_id}#{i}"`` otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvloom.engine.detokenizer import IncrementalDetokenizer
from kvloom.outputs import Choice, Completion, FinishReason, StreamChunk, TokenLogprob, Usage
from kvloom.params import SamplingParams
from kvloom.scheduler.output import EngineCoreOutput
from kvloom.tools.request import ToolRequest
from kvloom.tools.stream_parser import ToolCallStreamParser


def child_request_ids(parent_id: str, n: int) -> list[str]:
    return [parent_id] if n == 1 else [f"{parent_id}#{i}" for i in range(n)]


class _NullDetokenizer:
    """Used when the checkpoint has no tokenizer: text stays empty."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


@dataclass(slots=True)
class SequenceState:
    parent_id: str
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    tool_parser: ToolCallStreamParser | None = None
    """Set for a request with tools: splits the text into content and calls as it streams."""


@dataclass(slots=True)
class ParentState:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[SequenceState]
    arrival_time: float

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def completion(self) -> Completion:
        choices = [
            Choice(index=s.index, text=s.detok.text, token_ids=list(s.token_ids),
                   finish_reason=s.finish_reason, logprobs=s.logprobs)
            for s in self.seqs
        ]
        for choice, seq in zip(choices, self.seqs, strict=True):
            if seq.tool_parser is not None:
                choice.text, choice.tool_calls = seq.tool_parser.result()
                if choice.tool_calls and choice.finish_reason == "stop":
                    choice.finish_reason = "tool_calls"
        return Completion(self.request_id, list(self.prompt_token_ids), choices, self.usage())

    def usage(self) -> Usage:
        first = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        return Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=sum(len(s.token_ids) for s in self.seqs),
            cached_tokens=self.seqs[0].num_cached_tokens,
            time_to_first_token=min(first) - self.arrival_time if first else None,
            total_time=time.monotonic() - self.arrival_time,
        )


@dataclass(slots=True)
class ProcessedOutputs:
    deltas: list[StreamChunk]
    """What each sequence produced, in step order: the chunk its request's stream gets
    (``request_id`` the parent's id, ``index`` the choice; ``usage`` unset)."""
    stop_string_hits: list[str]
    """Sequence ids that hit a stop string: the caller finishes them in the core."""
    finished: list[Completion]
    failed: dict[str, Exception] = field(default_factory=dict)
    """Parent ids whose output could not be processed (the detokenizer raised), with the error:
    the caller fails those requests; their other outputs of this step are dropped."""


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else _NullDetokenizer()
        self.parents: dict[str, ParentState] = {}
        self.seqs: dict[str, SequenceState] = {}

    def add_request(
        self, parent_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float,
        tools: ToolRequest | None = None,
    ) -> list[str]:
        seq_ids = child_request_ids(parent_id, params.n)
        seqs = []
        for i, sid in enumerate(seq_ids):
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.skip_special_tokens, list(params.stop),
                params.include_stop_str_in_output,
            )
            seq = SequenceState(parent_id, i, detok, logprobs=[] if params.logprobs is not None else None,
                                tool_parser=tools.stream_parser() if tools is not None else None)
            self.seqs[sid] = seq
            seqs.append(seq)
        self.parents[parent_id] = ParentState(parent_id, list(prompt_token_ids), seqs, arrival)
        return seq_ids

    def abort(self, parent_id: str) -> tuple[list[str], Completion | None]:
        """Forget a request: its sequence ids (for the core to finish) and what it had produced,
        with ``finish_reason="abort"`` on every unfinished choice."""
        parent = self.parents.pop(parent_id, None)
        if parent is None:
            return [], None
        ids = child_request_ids(parent_id, len(parent.seqs))
        for sid in ids:
            seq = self.seqs.pop(sid, None)
            if seq is not None and seq.finish_reason is None:
                seq.finish_reason = "abort"
        return ids, parent.completion()

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        deltas: list[StreamChunk] = []
        hits: list[str] = []
        finished: list[Completion] = []
        now = time.monotonic()
        failed: dict[str, Exception] = {}
        for out in outputs:
            seq = self.seqs.get(out.req_id)
            if seq is None or seq.parent_id in failed:
                continue
            try:
                self._process_one(out, seq, now, deltas, hits, finished)
            except Exception as exc:  # one request's bad output must not fail the whole step
                failed[seq.parent_id] = exc
        return ProcessedOutputs(deltas, hits, finished, failed)

    def _process_one(
        self, out: EngineCoreOutput, seq: SequenceState, now: float, deltas: list[StreamChunk], hits: list[str],
        finished: list[Completion],
    ) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.num_cached_tokens = out.num_cached_tokens
        seq.token_ids.extend(out.new_token_ids)
        if seq.logprobs is not None and out.new_logprobs:
            seq.logprobs.extend(out.new_logprobs)
        seq.detok.add_tokens(out.new_token_ids)
        reason = out.finish_reason
        if seq.detok.stopped and reason is None:
            reason = "stop"
            hits.append(out.req_id)
        if seq.detok.stopped:
            # Token ids stay as generated (as in vLLM); only the text is cut at the stop string.
            reason = "stop"
        seq.finish_reason = reason
        text = seq.detok.take_delta(reason is not None)
        tool_deltas = None
        shown_reason = reason
        if seq.tool_parser is not None:
            text, tool_deltas = seq.tool_parser.feed(text, final=reason is not None)
            if reason == "stop" and seq.tool_parser.calls:
                shown_reason = "tool_calls"
        deltas.append(
            StreamChunk(seq.parent_id, seq.index, text, list(out.new_token_ids), out.new_logprobs, shown_reason,
                        tool_calls=tool_deltas or None)
        )
        if reason is not None:
            del self.seqs[out.req_id]
            parent = self.parents[seq.parent_id]
            if parent.finished:
                del self.parents[seq.parent_id]
                finished.append(parent.completion())

