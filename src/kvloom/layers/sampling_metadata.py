"""What the sampler is told each step, and what it hands back.

The runner builds one :class:`SamplingMetadata` per step with one row per request that samples
a token this step (``B`` rows, in the same order as the rows of the ``[B, V]`` logits). A
per-row setting that no row uses is ``None`` so the sampler skips that stage entirely; when
the tensor is present, rows that do not use the setting carry its neutral value.

All tensors live on the logits' device. Each ``generators[i]`` must be a generator for that
device too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``): dividing logits by them would
overflow float32. The runner computes ``all_greedy``/``all_random`` with the same threshold."""


@dataclass(slots=True)
class SamplingMetadata:
    """Per-step sampling inputs, one row per sampling request. Built by the runner."""

    temperature: torch.Tensor
    """``[B]`` float32. ``0.0`` (anything below ``GREEDY_TEMPERATURE``) makes the row greedy."""
    all_greedy: bool
    """Every row is greedy: the sampler takes an argmax and touches no RNG at all."""
    all_random: bool
    """No row is greedy: the sampler skips the argmax."""
    top_k: torch.Tensor | None
    """``[B]`` int64. ``0`` (or ``>= V``) turns top-k off for the row; ``None``: no row uses it."""
    top_p: torch.Tensor | None
    """``[B]`` float32 in ``(0, 1]``. ``1.0`` turns top-p off for the row."""
    min_p: torch.Tensor | None
    """``[B]`` float32 in ``[0, 1]``. ``0.0`` turns min-p off for the row."""
    repetition_penalty: torch.Tensor | None
    """``[B]`` float32 ``> 0``; ``1.0`` is off. HF/vLLM semantics over prompt and output tokens:
    positive logits are divided by it, negative ones multiplied."""
    presence_penalty: torch.Tensor | None
    """``[B]`` float32; ``0.0`` is off. OpenAI semantics, output tokens only:
    ``logit -= presence_penalty * (count > 0)``."""
    frequency_penalty: torch.Tensor | None
    """``[B]`` float32; ``0.0`` is off. OpenAI semantics, output tokens only:
    ``logit -= frequency_penalty * count``."""
    prompt_token_ids: list[list[int]] | None
    """Per row, the prompt's token ids. Required when ``repetition_penalty`` is set."""
    output_token_ids: list[list[int]] | None
    """Per row, the tokens generated so far (empty on the first step). Required when a penalty
    is set; ``None`` otherwise, so steps without penalties never copy every row's output."""
    generators: list[torch.Generator | None]
    """Per row: the seeded request's own generator, ``None`` for the default RNG. A row's
    random draws come only from its own generator, so a seed gives the same tokens whatever
    else is in the batch. Pass ``None`` for greedy rows: a greedy row needs no RNG, and in a
    mixed batch the sampler cannot tell which rows are greedy without reading ``temperature``
    back from the device."""
    banned_token_ids: list[list[int]] | None
    """Per row, token ids that must not be sampled this step (e.g. EOS and stop ids while the
    request is below ``min_tokens``). ``None``: no row bans anything."""
    max_num_logprobs: int | None
    """Largest number of top logprobs any row asked for; ``0``: only the sampled token's;
    ``None``: no row asked for logprobs this step."""
    default_generator: torch.Generator | None = None
    """RNG of the rows without a generator of their own (the engine's, so sampling never
    draws from, or disturbs, torch's global RNG); ``None``: torch's default generator."""


@dataclass(slots=True)
class SamplerOutput:
    """The sampled tokens, plus logprobs when some row asked for them.

    Logprobs are taken from the raw model distribution (``log_softmax`` of the logits as the
    model produced them, before banned tokens, penalties, temperature and top-k/top-p/min-p):
    vLLM's default ``logprobs_mode="raw_logprobs"``. A row that asked for fewer than
    ``max_num_logprobs`` slices the first ``1 + n`` columns.
    """

    token_ids: torch.Tensor
    """``[B]`` int64: the sampled token of each row."""
    logprobs: torch.Tensor | None
    """``[B, 1 + max_num_logprobs]`` float32: the sampled token's logprob, then the top-N
    logprobs in descending order. ``None`` when ``max_num_logprobs is None``."""
    logprob_token_ids: torch.Tensor | None
    """``[B, 1 + max_num_logprobs]`` int64: the sampled token id, then the top-N ids."""
    sampled_ranks: torch.Tensor | None
    """``[B]`` int64: rank of the sampled token in the raw distribution, 1 = most likely. Ties
    count against it (vLLM): rank = number of tokens whose logprob is ``>=`` its own."""
