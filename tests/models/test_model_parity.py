"""kvloom's model over a paged cache gives the logits transformers gives on the same checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvloom.models.loader import load_model
from kvloom.models.registry import CausalLM

ATOL = 1e-4


@pytest.fixture(scope="session")
def hf_models() -> dict[Path, Any]:
    return {}


def _hf(cache: dict[Path, Any], path: Path) -> Any:
    import transformers

    if path not in cache:
        auto: Any = transformers.AutoModelForCausalLM
        cache[path] = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return cache[path]


@torch.no_grad()
def _hf_logits(hf: Any, tokens: list[int]) -> torch.Tensor:
    """HF logits ``[len(tokens), vocab]`` for one unpadded sequence."""
    logits: torch.Tensor = hf(torch.tensor([tokens])).logits[0].float()
    return logits


def _prompts(vocab_size: int, lens: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lens]


@torch.no_grad()
def _run(model: CausalLM, kv: Any, new_tokens: dict[int, list[int]]) -> list[torch.Tensor]:
    """One step; returns each scheduled sequence's logits ``[num_new, vocab]`` in schedule order."""
    input_ids, positions, meta = kv.step(new_tokens)
    hidden = model(input_ids, positions, kv.kv_caches, meta)
    assert hidden.shape == (len(input_ids), model.config.hidden_size)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (len(input_ids), model.config.vocab_size)
    qsl = meta.query_start_loc_cpu
    return [logits[qsl[i] : qsl[i + 1]] for i in range(len(new_tokens))]


def _assert_close(mine: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (mine - ref).abs().max().item()
    assert err <= ATOL, f"{what}: max |kvloom - transformers| = {err:.2e} > {ATOL}"


@pytest.mark.parametrize("lens", [[13], [5, 17, 9]], ids=["one_seq", "batch3"])
def test_prefill_then_decode_matches_transformers(
    variant: str,
    lens: list[int],
    checkpoints: dict[str, Path],
    attn_backend: Any,
    paged_kv: Any,
    hf_models: dict[Path, Any],
) -> None:
    path = checkpoints[variant]
    model, config = load_model(path, attn_backend=attn_backend)
    hf = _hf(hf_models, path)
    prompts = _prompts(config.vocab_size, lens, seed=len(lens))
    kv = paged_kv(config)

    prefill = _run(model, kv, dict(enumerate(prompts)))
    next_tokens = {}
    for i, prompt in enumerate(prompts):
        _assert_close(prefill[i], _hf_logits(hf, prompt), f"{variant} prefill seq {i}")
        next_tokens[i] = [int(prefill[i][-1].argmax())]

    decode = _run(model, kv, next_tokens)  # every sequence has query length 1: a pure decode batch
    for i, prompt in enumerate(prompts):
        _assert_close(decode[i][0], _hf_logits(hf, prompt + next_tokens[i])[-1], f"{variant} decode seq {i}")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_mixed_decode_and_chunked_prefill_matches_transformers(
    name: str, checkpoints: dict[str, Path], attn_backend: Any, paged_kv: Any, hf_models: dict[Path, Any]
) -> None:
    """Step 2 mixes two decodes with the second chunk of a prompt whose first chunk is cached."""
    path = checkpoints[name]
    model, config = load_model(path, attn_backend=attn_backend)
    hf = _hf(hf_models, path)
    a, b, c = _prompts(config.vocab_size, [6, 11, 15], seed=3)
    kv = paged_kv(config)
    first = _run(model, kv, {0: a, 1: b, 2: c[:7]})
    _assert_close(first[2], _hf_logits(hf, c)[:7], f"{name} first chunk")
    a_next, b_next = int(first[0][-1].argmax()), int(first[1][-1].argmax())

    second = _run(model, kv, {0: [a_next], 1: [b_next], 2: c[7:]})
    _assert_close(second[0][0], _hf_logits(hf, [*a, a_next])[-1], f"{name} decode a")
    _assert_close(second[1][0], _hf_logits(hf, [*b, b_next])[-1], f"{name} decode b")
    _assert_close(second[2], _hf_logits(hf, c)[7:], f"{name} second chunk")


def test_tiny_init_gives_robust_greedy_decisions(
    checkpoints: dict[str, Path], hf_models: dict[Path, Any]
) -> None:
    """The tiny-model init must not give near-flat logits (greedy would flip on float noise)."""
    for name in ("llama", "qwen2", "llama_tied"):
        hf = _hf(hf_models, checkpoints[name])
        (prompt,) = _prompts(512, [64], seed=11)
        logits = _hf_logits(hf, prompt)
        assert torch.isfinite(logits).all()
        top2 = logits.topk(2, dim=-1).values
        gaps = top2[:, 0] - top2[:, 1]
        assert gaps.median() > 0.05, f"{name}: median top-1/top-2 gap {gaps.median():.2e}"
        assert (gaps < 1e-3).float().mean() < 0.05, f"{name}: too many near-ties"
