"""What a user of ``LLM`` relies on: seeds, stops, n, chat, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from kvloom import LLM, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(llama_dir, max_model_len=256)


PROMPT = [11, 42, 7, 99, 123, 5, 77]
OTHERS = [[13, 14, 15], list(range(20, 60)), [300, 301, 302, 303, 304]]


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].token_ids
    mixed_params = [
        SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True),
        seeded,
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.3, seed=7, top_p=0.9, max_tokens=16, ignore_eos=True),
    ]
    mixed = llm.generate([OTHERS[0], PROMPT, OTHERS[1], OTHERS[2]], mixed_params)
    assert mixed[1].token_ids == alone
    other_seed = llm.generate([PROMPT], seeded.model_copy(update={"seed": 4321}))[0].token_ids
    assert other_seed != alone
    llm.core.assert_idle()


def test_temperature_zero_is_greedy_and_top_k_one_too(llm: LLM) -> None:
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    top1 = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_n_choices_equal_separate_requests_with_consecutive_seeds(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=99, n=3, max_tokens=10, ignore_eos=True)
    together = llm.generate([PROMPT], params)[0]
    assert [c.index for c in together.choices] == [0, 1, 2]
    for i, choice in enumerate(together.choices):
        alone = llm.generate([PROMPT], params.model_copy(update={"n": 1, "seed": 99 + i}))[0]
        assert choice.token_ids == alone.token_ids
    assert together.usage.completion_tokens == 30


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].token_ids
    stop_tok = greedy[2]
    first_hit = greedy.index(stop_tok)
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy[: first_hit + 1]
    held = llm.generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_tok], min_tokens=first_hit + 2)
    )[0]
    assert stop_tok not in held.token_ids[: first_hit + 2]
    assert len(held.token_ids) >= first_hit + 2


def test_stop_string_cuts_the_text(llm: LLM) -> None:
    full = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    kept = llm.generate(
        "Once upon a time", SamplingParams(temperature=0.0, max_tokens=30, stop=stop, include_stop_str_in_output=True)
    )[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    llm.core.assert_idle()


def test_text_prompt_and_chat_messages(llm: LLM) -> None:
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode("The quick brown fox"))
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    chat = llm.chat([{"role": "user", "content": "Hello there"}], SamplingParams(temperature=0.0, max_tokens=4))[0]
    expected = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=True
    )
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat.prompt_token_ids == list(expected)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([1, 2, 10_000], SamplingParams(), "prompt"),
        ([1, 2, 3], SamplingParams(max_tokens=254), "max_tokens"),
    ],
)
def test_bad_requests_fail_before_queueing_and_name_the_field(
    llm: LLM, prompt: object, params: SamplingParams, field: str
) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        llm.generate([prompt], params)  # type: ignore[list-item]
    assert not llm.core.has_unfinished()
    # The engine keeps serving.
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"temprature": 1.0}, "temprature"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_unseeded_sampling_uses_the_engine_rng_not_torch_global_rng(llm: LLM) -> None:
    import torch

    before = torch.get_rng_state()
    llm.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True))
    assert torch.equal(before, torch.get_rng_state())


def test_logprobs_zero_returns_the_sampled_tokens_logprob_only(llm: LLM) -> None:
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, logprobs=0, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and lp.top == () and lp.rank == 1 and lp.logprob <= 0.0
