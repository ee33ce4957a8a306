"""Per-step sampling inputs from the runner's request states, and logprobs back to records."""

from __future__ import annotations

import torch

from kvloom.layers.host_copy import tensor_on
from kvloom.layers.sampler import GREEDY_TEMPERATURE, SamplerOutput, SamplingMetadata
from kvloom.outputs import TokenLogprob
from kvloom.runner.state import PENDING_TOKEN, CachedRequestState


def needs_host_tokens(states: list[CachedRequestState]) -> bool:
    """Whether sampling these rows reads each sequence's tokens so far on the host: logits processors
    (a grammar's mask follows every accepted token) and penalties (they count the output). Such a
    step scheduled ahead samples only once the step before it is read back
    (``ModelRunner.launch_sample``)."""
    return any(
        s.processors or s.params.repetition_penalty != 1.0 or s.params.presence_penalty != 0.0
        or s.params.frequency_penalty != 0.0
        for s in states
    )


def build_sampling_metadata(
    states: list[CachedRequestState], eos_token_ids: frozenset[int], device: torch.device,
    default_generator: torch.Generator | None,
) -> SamplingMetadata:
    """One row per sampling request, in batch order. Optional tensors are None when no row uses them."""
    params = [s.params for s in states]

    def col(values: list[float], off: float) -> torch.Tensor | None:
        if all(v == off for v in values):
            return None
        return tensor_on(values, torch.float32, device)

    # Host lists reach the device through ``tensor_on``: no wait for a step still in flight.
    temperature = tensor_on([p.temperature for p in params], torch.float32, device)
    top_k_vals = [p.top_k for p in params]
    top_k = None if all(k == 0 for k in top_k_vals) else tensor_on(top_k_vals, torch.int64, device)
    rep = col([p.repetition_penalty for p in params], 1.0)
    presence = col([p.presence_penalty for p in params], 0.0)
    frequency = col([p.frequency_penalty for p in params], 0.0)
    outputs = [s.output_token_ids for s in states] if rep is not None or presence is not None or frequency is not None \
        else None
    if outputs is not None and any(PENDING_TOKEN in o for o in outputs):
        raise RuntimeError("penalties over a token still on the device: this step's sampling was launched before "
                           "the step before it was collected (needs_host_tokens)")

    banned: list[list[int]] = []
    for s in states:
        p = s.params
        # A grammar allows EOS only where the output is complete, and there it may be the only
        # token allowed: min_tokens must not ban it.
        grammar = any(proc.uses_bitmask for proc in s.processors)
        if len(s.token_ids) - s.num_prompt_tokens < p.min_tokens and not grammar:
            stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(eos_token_ids))
            banned.append(stop_ids)
        else:
            banned.append([])

    return SamplingMetadata(
        temperature=temperature,
        all_greedy=all(p.temperature < GREEDY_TEMPERATURE for p in params),
        all_random=all(p.temperature >= GREEDY_TEMPERATURE for p in params),
        top_k=top_k,
        top_p=col([p.top_p for p in params], 1.0),
        min_p=col([p.min_p for p in params], 0.0),
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
        prompt_token_ids=[s.token_ids[: s.num_prompt_tokens] for s in states] if rep is not None else None,
        # Copying every row's output each step costs O(tokens so far): only penalties need it.
        output_token_ids=outputs,
        generators=[s.generator if s.params.temperature >= GREEDY_TEMPERATURE else None for s in states],
        banned_token_ids=banned if any(banned) else None,
        max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
        default_generator=default_generator,
    )


def to_token_logprobs(states: list[CachedRequestState], out: SamplerOutput) -> list[TokenLogprob | None] | None:
    """Cut the batch's top-N logprobs down to each request's own N."""
    if out.logprobs is None or out.logprob_token_ids is None:
        return None
    values = out.logprobs.tolist()
    ids = out.logprob_token_ids.tolist()
    ranks = out.sampled_ranks.tolist() if out.sampled_ranks is not None else [0] * len(states)
    result: list[TokenLogprob | None] = []
    for i, s in enumerate(states):
        n = s.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = tuple(zip(ids[i][1 : 1 + n], values[i][1 : 1 + n], strict=True))
        result.append(TokenLogprob(token_id=ids[i][0], logprob=values[i][0], rank=int(ranks[i]), top=top))
    return result
