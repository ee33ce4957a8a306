"""The batched sampler against argmax, HF's logits processors/warpers and hand-computed formulas."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvloom.layers.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    greedy_token_ids,
)


@dataclass
class Row:
    """One request's sampling settings; defaults are all "off", temperature 1."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    banned: list[int] = field(default_factory=list)
    num_logprobs: int | None = None


def make_meta(rows: list[Row]) -> SamplingMetadata:
    """Like the runner: a setting no row uses is None."""

    def col(values: list[float], off: float) -> torch.Tensor | None:
        return None if all(v == off for v in values) else torch.tensor(values, dtype=torch.float32)

    top_k = [r.top_k for r in rows]
    rep = col([r.repetition_penalty for r in rows], 1.0)
    return SamplingMetadata(
        temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32),
        all_greedy=all(r.temperature == 0.0 for r in rows),
        all_random=all(r.temperature > 0.0 for r in rows),
        top_k=None if not any(top_k) else torch.tensor(top_k, dtype=torch.int64),
        top_p=col([r.top_p for r in rows], 1.0),
        min_p=col([r.min_p for r in rows], 0.0),
        repetition_penalty=rep,
        presence_penalty=col([r.presence_penalty for r in rows], 0.0),
        frequency_penalty=col([r.frequency_penalty for r in rows], 0.0),
        prompt_token_ids=[r.prompt for r in rows] if rep is not None else None,
        output_token_ids=[r.output for r in rows],
        generators=[r.generator for r in rows],
        banned_token_ids=[r.banned for r in rows] if any(r.banned for r in rows) else None,
        max_num_logprobs=max((r.num_logprobs for r in rows if r.num_logprobs is not None), default=None),
    )


def sample(logits: torch.Tensor, rows: list[Row]) -> SamplerOutput:
    return Sampler()(logits.clone(), make_meta(rows))


@contextmanager
def seeded_default_rng(seed: int) -> Iterator[None]:
    """Deterministic default RNG inside, untouched outside (other tests see no difference)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits_from_probs(probs: list[float], shift: float = 3.0) -> torch.Tensor:
    """``[V]`` logits whose softmax is ``probs`` (shifted: softmax ignores constants)."""
    return torch.tensor(probs, dtype=torch.float64).log().float() + shift


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax_and_touches_no_rng() -> None:
    logits = torch.randn(6, 50, generator=gen(0))
    rows = [Row(temperature=0.0, generator=gen(i) if i % 2 else None) for i in range(6)]
    rng_before = torch.get_rng_state()
    gen_states_before = [r.generator.get_state() for r in rows if r.generator is not None]

    out = sample(logits, rows)

    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(torch.get_rng_state(), rng_before)
    gen_states_after = [r.generator.get_state() for r in rows if r.generator is not None]
    assert all(torch.equal(a, b) for a, b in zip(gen_states_before, gen_states_after, strict=True))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_greedy_takes_the_first_of_tied_maxima_and_a_nan_as_argmax_does() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, float("nan"), 5.0, float("nan")],
                           [float("-inf")] * 4, [float("inf"), 1.0, float("inf"), 0.0]])
    expected = logits.argmax(dim=-1)
    assert expected.tolist() == [1, 1, 0, 0]
    assert torch.equal(greedy_token_ids(logits), expected)
    assert torch.equal(sample(logits.clone(), [Row(temperature=0.0) for _ in range(4)]).token_ids, expected)


def test_temperature_zero_rows_are_greedy_in_a_mixed_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100, generator=gen(1))
    rows = [
        Row(
            temperature=0.0 if i % 2 == 0 else 1.5,
            top_k=5 * (i % 3),
            top_p=0.9,
            frequency_penalty=0.5,
            output=[i, i, 7],
        )
        for i in range(8)
    ]
    # The argmax of the *penalised* logits: greedy comes after penalties.
    expected = apply_penalties(logits.clone(), make_meta(rows)).argmax(dim=-1)
    assert not torch.equal(expected, logits.argmax(dim=-1))  # the penalties matter here
    for seed in range(5):
        with seeded_default_rng(seed):
            out = sample(logits, rows)
        assert torch.equal(out.token_ids[0::2], expected[0::2])


# --- seeded reproducibility ------------------------------------------------------------------


def test_seeded_rows_reproduce_across_batch_compositions() -> None:
    """Same seed + same logits -> same tokens, wherever the row sits and whoever else is there."""
    vocab_size, num_steps = 256, 6
    step_logits = [torch.randn(2, vocab_size, generator=gen(100 + s)) * 2 for s in range(num_steps)]

    def target(which: int, output: list[int]) -> Row:
        if which == 0:  # top-k only: takes the topk path alone, the sort path next to a top-p row
            return Row(temperature=0.8, top_k=20, min_p=0.02, generator=gen(1234), output=output)
        return Row(temperature=1.3, top_p=0.9, presence_penalty=0.4, generator=gen(99), output=output)

    def others(step: int) -> list[Row]:
        return [
            Row(temperature=0.0),
            Row(temperature=0.7, generator=gen(7 + step)),
            Row(temperature=1.0, top_k=3),
            Row(temperature=1.1, top_p=0.5, min_p=0.1, repetition_penalty=1.2, prompt=[1, 2, 3]),
            Row(temperature=0.0, generator=gen(5)),
        ]

    # Where each target sits ({target: row index}), and how many other rows share the batch.
    layouts: list[tuple[dict[int, int], int]] = [
        ({0: 0}, 0),
        ({1: 0}, 0),
        ({0: 3, 1: 1}, 5),
        ({0: 0, 1: 6}, 5),
        ({0: 2}, 3),
        ({1: 4}, 4),
    ]
    results: list[dict[int, list[int]]] = []
    for layout_idx, (positions, num_others) in enumerate(layouts):
        targets = {w: target(w, []) for w in positions}
        tokens: dict[int, list[int]] = {w: [] for w in positions}
        with seeded_default_rng(layout_idx):  # unseeded rows see a different default RNG each time
            for step in range(num_steps):
                rows = others(step)[:num_others]
                for w in sorted(positions, key=positions.__getitem__):
                    rows.insert(positions[w], targets[w])
                logits = torch.randn(len(rows), vocab_size) * 2
                for w, pos in positions.items():
                    logits[pos] = step_logits[step][w]
                out = sample(logits, rows)
                for w, pos in positions.items():
                    tokens[w].append(int(out.token_ids[pos]))
                    targets[w].output = [*targets[w].output, tokens[w][-1]]
        results.append(tokens)

    for w in (0, 1):
        runs = [r[w] for r in results if w in r]
        assert len(runs) == 4
        assert all(run == runs[0] for run in runs), runs
        assert len(set(runs[0])) > 1  # actually random, not stuck on the argmax
    assert results[0][0] != results[1][1]


# --- filters ---------------------------------------------------------------------------------


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(16, 300, generator=gen(2))
    with seeded_default_rng(0):
        out = sample(logits, [Row(temperature=2.0, top_k=1) for _ in range(16)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_top_k_samples_only_within_each_rows_top_k() -> None:
    logits = torch.randn(64, generator=gen(3)) * 0.5
    top5 = set(logits.topk(5).indices.tolist())
    rows = [Row(top_k=5 if i % 2 == 0 else 0) for i in range(4000)]
    with seeded_default_rng(0):
        tokens = sample(logits.expand(4000, -1), rows).token_ids
    assert set(tokens[0::2].tolist()) == top5
    # Rows with top-k off in the same batch are not truncated.
    assert len(set(tokens[1::2].tolist()) - top5) > 20


def test_top_p_samples_only_within_the_nucleus() -> None:
    # Probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 in a shuffled order.
    probs = [0.06, 0.25, 0.04, 0.4, 0.1, 0.15]
    logits = logits_from_probs(probs)
    num_draws = 8000
    with seeded_default_rng(0):
        tokens = sample(logits.expand(num_draws, -1), [Row(top_p=0.7)] * num_draws).token_ids
    # Mass before 0.15 is 0.65 < 0.7 (kept), before 0.1 it is 0.8 (cut): nucleus {0.4, 0.25, 0.15}.
    counts = Counter(tokens.tolist())
    assert set(counts) == {3, 1, 5}
    for tok, p in ((3, 0.4), (1, 0.25), (5, 0.15)):
        assert abs(counts[tok] / num_draws - p / 0.8) < 0.02

    # Top-p applies to the top-k renormalised distribution (HF order): top-2 renormalised is
    # [0.615, 0.385], so p = 0.6 keeps only the first, though on the full distribution it keeps two.
    with seeded_default_rng(1):
        tokens = sample(logits.expand(500, -1), [Row(top_k=2, top_p=0.6)] * 500).token_ids
    assert set(tokens.tolist()) == {3}


def test_top_p_keeps_the_smallest_nucleus_and_p_one_keeps_everything() -> None:
    # Exact powers of two, so the cumulative mass hits p exactly at the boundary.
    exact = logits_from_probs([0.125, 0.5, 0.125, 0.25])
    # softmax of [20, 20, 0, 0] saturates the float32 cumsum to 1.0 after two tokens.
    saturating = torch.tensor([20.0, 0.0, 20.0, 0.0])
    logits = torch.stack([exact, exact, saturating])
    apply_top_k_top_p(logits, None, torch.tensor([0.5, 0.75, 1.0]))
    kept = [set(row.isfinite().nonzero().flatten().tolist()) for row in logits]
    assert kept == [{1}, {1, 3}, {0, 1, 2, 3}]


def test_min_p_never_samples_below_threshold() -> None:
    logits = logits_from_probs([0.04, 0.3, 0.2, 0.4, 0.06])
    with seeded_default_rng(0):
        tokens = sample(logits.expand(5000, -1), [Row(min_p=0.2)] * 5000).token_ids
    # 0.2 * 0.4 = 0.08: the 0.06 and 0.04 tokens are out.
    assert set(tokens.tolist()) == {1, 2, 3}


def test_filters_match_hf_warpers() -> None:
    """Surviving tokens equal those of HF's Temperature -> TopK -> TopP -> MinP warper chain."""
    num_rows, vocab_size = 24, 200
    logits = torch.randn(num_rows, vocab_size, generator=gen(4)) * 2
    g = gen(5)
    rows = [
        Row(
            temperature=float(torch.empty(1).uniform_(0.3, 2.0, generator=g)),
            top_k=int(torch.randint(0, 60, (1,), generator=g)) * (i % 3 != 0),
            top_p=float(torch.empty(1).uniform_(0.3, 1.0, generator=g)) if i % 4 != 1 else 1.0,
            min_p=float(torch.empty(1).uniform_(0.0, 0.2, generator=g)) if i % 2 else 0.0,
        )
        for i in range(num_rows)
    ]
    meta = make_meta(rows)
    assert meta.top_k is not None and meta.top_p is not None and meta.min_p is not None

    ours = logits.clone().div_(meta.temperature.unsqueeze(1))
    apply_top_k_top_p(ours, meta.top_k, meta.top_p)
    probs = ours.softmax(dim=-1)
    apply_min_p(probs, meta.min_p)

    top_k_only = logits.clone().div_(meta.temperature.unsqueeze(1))
    apply_top_k_top_p(top_k_only, meta.top_k, None)  # the topk (no sort) path

    for i, r in enumerate(rows):
        ids = torch.zeros(1, 1, dtype=torch.int64)
        hf = TemperatureLogitsWarper(r.temperature)(ids, logits[i : i + 1].clone())
        if r.top_k:
            hf = TopKLogitsWarper(r.top_k)(ids, hf)
            hf_top_k_only = hf.clone()
        else:
            hf_top_k_only = hf.clone()
        if r.top_p < 1.0:
            hf = TopPLogitsWarper(r.top_p)(ids, hf)
        if r.min_p > 0.0:
            hf = MinPLogitsWarper(r.min_p)(ids, hf)
        assert torch.equal(probs[i] > 0, hf[0].isfinite()), i
        assert torch.equal(top_k_only[i].isfinite(), hf_top_k_only[0].isfinite()), i


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    expected = (logits / temperature).softmax(dim=-1)
    num_draws = 20_000
    # Every 4th row seeded with its own generator, the rest on the default RNG.
    rows = [Row(temperature=temperature, generator=gen(i) if i % 4 == 0 else None) for i in range(num_draws)]
    with seeded_default_rng(0):
        tokens = sample(logits.expand(num_draws, -1), rows).token_ids
    for subset, tol in ((tokens, 0.01), (tokens[0::4], 0.02)):
        freq = torch.bincount(subset, minlength=8).double() / subset.numel()
        assert (freq - expected).abs().max() < tol
        chi2 = (((freq - expected) ** 2) / expected).sum() * subset.numel()
        assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def test_zero_probability_tokens_are_never_sampled_even_at_the_edges() -> None:
    """The inverse CDF gives a zero-probability token an empty interval: first, last, or between."""
    from kvloom.layers.sampler import random_sample

    num_rows, vocab = 4000, 64
    allowed = torch.tensor([1, 2, 30, 62])  # token 0 and token 63 are masked: the edges u=0, u->1
    probs = torch.zeros(num_rows, vocab)
    probs[:, allowed] = torch.rand(num_rows, len(allowed), generator=gen(3)) + 1e-3
    probs[::7, 1] = 1e-30  # an almost-zero neighbour of a masked token
    generators: list[torch.Generator | None] = [gen(i) if i % 2 else None for i in range(num_rows)]
    tokens = random_sample(probs.clone(), generators, gen(99))
    assert set(tokens.tolist()) <= set(allowed.tolist())
    assert set(tokens.tolist()) >= {2, 30, 62}
    # A row with nothing allowed (a grammar dead end) still returns an index, never raises.
    assert 0 <= int(random_sample(torch.zeros(1, vocab), [None], gen(1))[0]) < vocab


def test_a_seeded_row_draws_one_number_per_step() -> None:
    """The same seed gives the same token for the same distribution, whatever the vocab padding."""
    from kvloom.layers.sampler import random_sample

    probs = torch.softmax(torch.randn(1, 50, generator=gen(5)), dim=-1)
    padded = torch.cat([probs, torch.zeros(1, 14)], dim=1)  # a padded lm_head: extra zero columns
    a = random_sample(probs.clone(), [gen(7)], None)
    b = random_sample(padded.clone(), [gen(7)], None)
    assert int(a[0]) == int(b[0])


# --- penalties and banned tokens --------------------------------------------------------------


def test_repetition_penalty_matches_hf() -> None:
    logits = torch.randn(4, 50, generator=gen(6)) * 3
    rows = [
        Row(repetition_penalty=p, prompt=prompt, output=output)
        for p, prompt, output in (
            (1.0, [1, 2, 3], [4]),
            (1.3, [5, 5, 6, 49], [7, 7, 0]),
            (0.8, [10, 11], []),
            (2.0, [], [12, 13, 12]),
        )
    ]
    ours = apply_penalties(logits.clone(), make_meta(rows))
    for i, r in enumerate(rows):
        ids = torch.tensor([r.prompt + r.output])
        hf = RepetitionPenaltyLogitsProcessor(r.repetition_penalty)(ids, logits[i : i + 1].clone())
        assert torch.equal(ours[i], hf[0]), i
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    logits = torch.randn(3, 30, generator=gen(7))
    rows = [
        Row(presence_penalty=0.5, frequency_penalty=0.25, prompt=[9, 9], output=[1, 2, 2, 2, 5]),
        Row(presence_penalty=-0.3, output=[3, 3]),
        Row(frequency_penalty=1.0, output=[]),
    ]
    ours = apply_penalties(logits.clone(), make_meta(rows))
    expected = logits.clone()
    for i, r in enumerate(rows):
        for tok, count in Counter(r.output).items():
            expected[i, tok] -= r.frequency_penalty * count + r.presence_penalty * (count > 0)
    assert torch.allclose(ours, expected)
    assert ours[0, 9] == logits[0, 9]  # prompt tokens are not penalised by presence/frequency


def test_repetition_penalty_requires_prompt_ids() -> None:
    meta = make_meta([Row(repetition_penalty=1.2, prompt=[1])])
    meta.prompt_token_ids = None
    with pytest.raises(ValueError, match="prompt_token_ids"):
        apply_penalties(torch.zeros(1, 4), meta)


def test_banned_tokens_are_never_sampled() -> None:
    num_rows = 2000
    logits = torch.randn(num_rows, 20, generator=gen(8))
    logits[:, 4] = 50.0  # the overwhelming argmax
    logits[:, 11] = 49.0
    rows = [Row(temperature=0.0 if i < 10 else 1.0, banned=[4, 17]) for i in range(num_rows)]
    # Not banned: takes the argmax (at temperature 0.1, token 11 has odds e^-10 against it).
    rows[-1] = Row(temperature=0.1)
    with seeded_default_rng(0):
        tokens = sample(logits, rows).token_ids
    assert tokens[:10].tolist() == [11] * 10  # greedy rows take the best allowed token
    assert not ({4, 17} & set(tokens[:-1].tolist()))
    assert int(tokens[-1]) == 4


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_raw_with_sorted_top_n_and_ranks() -> None:
    logits = torch.randn(5, 40, generator=gen(9)) * 2
    raw = logits.log_softmax(dim=-1)
    best = int(logits[2].argmax())
    rows = [
        Row(temperature=0.0, num_logprobs=3),
        Row(temperature=1.0, top_k=10),
        Row(temperature=0.0, banned=[best], num_logprobs=1),
        Row(temperature=2.5, repetition_penalty=1.5, prompt=[1, 2]),
        Row(temperature=0.7, presence_penalty=1.0, output=[0, 3], generator=gen(1)),
    ]
    with seeded_default_rng(0):
        out = sample(logits, rows)
    assert out.logprobs is not None and out.logprob_token_ids is not None and out.sampled_ranks is not None
    assert out.logprobs.shape == (5, 4) and out.logprobs.dtype == torch.float32
    assert out.logprob_token_ids.shape == (5, 4) and out.logprob_token_ids.dtype == torch.int64
    assert out.sampled_ranks.shape == (5,) and out.sampled_ranks.dtype == torch.int64

    tokens = out.token_ids
    assert torch.equal(out.logprob_token_ids[:, 0], tokens)
    assert torch.allclose(out.logprobs[:, 0], raw.gather(1, tokens.unsqueeze(1)).squeeze(1))
    top = raw.topk(3, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    assert torch.allclose(out.logprobs[:, 1:], top.values)
    assert bool((out.logprobs[:, 1:-1] >= out.logprobs[:, 2:]).all())
    expected_ranks = 1 + (raw > raw.gather(1, tokens.unsqueeze(1))).sum(dim=-1)
    assert torch.equal(out.sampled_ranks, expected_ranks)

    assert int(out.sampled_ranks[0]) == 1
    # Raw semantics: the banned argmax still tops row 2's distribution; the sampled token is not it.
    assert int(out.logprob_token_ids[2, 1]) == best and int(tokens[2]) != best
    assert int(out.sampled_ranks[2]) == 2


def test_sampled_rank_counts_ties_against_the_sampled_token() -> None:
    """vLLM's rule: rank = number of tokens at least as likely, so a tied argmax ranks 2."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 2.0, 1.0, 0.5]])
    out = sample(logits, [Row(temperature=0.0, num_logprobs=2)] * 2)
    assert out.token_ids.tolist() == [1, 1]
    assert out.sampled_ranks is not None and out.sampled_ranks.tolist() == [2, 1]


def test_a_uniform_draw_at_the_top_of_its_range_stays_in_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """u = the largest float below 1, on rows whose last tokens are masked: still a real token."""
    from kvloom.layers import sampler

    def top_uniform(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.fill_(1.0 - 2.0**-24)

    monkeypatch.setattr(torch.Tensor, "uniform_", top_uniform)
    probs = torch.tensor([[0.2, 0.3, 0.5, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 7.0]])
    tokens = sampler.random_sample(probs.clone(), [None, torch.Generator().manual_seed(1), None], None)
    assert tokens.tolist() == [2, 2, 4]  # the last token with probability > 0 of each row
