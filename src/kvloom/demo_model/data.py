"""Training batches for the demo model: chats rendered, tokenized and masked so the loss is on the
assistant's turns only.

``encode(example, tokenizer)`` gives ``(ids, mask)``: ``mask[i]`` is 1 where token ``i`` belongs to an
assistant turn's reply (its text and the closing ``<|im_end|>``), the tokens a model is trained to
write; the system, user and tool turns are context. ``batches(...)`` groups examples of similar length
(a token budget per batch, right padding), so a batch wastes little on padding; with right padding
and causal attention no real token ever attends to a pad, so no attention mask is needed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvloom.demo_model.corpus import Example, generate
from kvloom.demo_model.tokenizer import render
from kvloom.demo_model.words import Split

_ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)


def encode(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and the 0/1 loss mask over them (1 on assistant replies)."""
    text = render(example.messages, example.tools)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = [m.span(1) for m in _ASSISTANT.finditer(text)]
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def stream(seed: int, split: Split, weights: Callable[[], dict[str, float]], tokenizer: Any,
           max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Encoded examples forever; ``weights()`` is asked before each draw (a curriculum changes it)."""
    rng = random.Random(seed)
    while True:
        mix = weights()
        names = list(mix)
        example = generate(rng.choices(names, [mix[n] for n in names])[0], rng, split)
        ids, mask = encode(example, tokenizer)
        if len(ids) <= max_len:
            yield ids, mask


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids (right-padded with ``pad_id``) and ``[B, T]`` float targets' mask shifted for
    next-token loss: ``mask[b, t]`` weights the prediction of token ``t + 1`` from position ``t``."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (row, row_mask) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row) - 1] = torch.tensor(row_mask[1:], dtype=torch.float32)
    return ids, mask


def repeat_batch(rng: random.Random, rows: int, *, first_id: int, vocab_size: int, sep_id: int, end_id: int,
                 bos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stepping stone: ``[bos] s [sep] s [end]`` for random spans ``s`` of 6-30 ids in
    ``[first_id, vocab_size)``, the loss on the repeat only. A head attending one span length back
    solves it, so it is learned in a few hundred steps from nothing, and it builds the half of an
    induction head that copies an attended id to the output; ``induction_row`` then needs only the
    half that finds where to attend. From nothing, ``induction_row`` alone stayed at chance for 450
    steps."""
    encoded = []
    for _ in range(rows):
        n = rng.randint(6, 30)
        span = [rng.randrange(first_id, vocab_size) for _ in range(n)]
        encoded.append(([bos_id, *span, sep_id, *span, end_id], [0] * (n + 2) + [1] * (n + 1)))
    return collate(encoded, pad_id)


def induction_row(rng: random.Random, length: int, *, first_id: int, vocab_size: int,
                  bos_id: int) -> tuple[list[int], list[int]]:
    """One lesson in copying by content: ``length`` random ids in ``[first_id, vocab_size)`` into
    which chunks of 3-10 ids copied from random earlier places are spliced; the loss is on every
    copied id but the first of its chunk (``mask``), which nothing predicts.

    A copied chunk starts at a random distance from its source, so only matching the current id
    against earlier ones (and copying what followed) predicts it: an induction head. Rows with a
    small alphabet (16-256 ids) repeat single ids often, so there only a match on the last two or
    three ids finds the right source. The first version of this lesson repeated a whole span right
    after itself, which a head attending at a fixed offset solves: the run-5 model copied such spans
    at 0.98 and chunks at a random distance at 0.01.
    """
    alphabet = rng.choice((0, 0, 256, 64, 16))
    pool = [rng.randrange(first_id, vocab_size) for _ in range(alphabet)]

    def draw() -> int:
        return rng.choice(pool) if pool else rng.randrange(first_id, vocab_size)

    ids, mask = [bos_id], [0]
    while len(ids) < length:
        if len(ids) > 16 and rng.random() < 0.4:
            n = rng.randint(3, 10)
            start = rng.randrange(1, len(ids) - n)
            ids += ids[start:start + n]
            mask += [0] + [1] * (n - 1)
        else:
            n = rng.randint(1, 8)
            ids += [draw() for _ in range(n)]
            mask += [0] * n
    return ids[:length], mask[:length]


def induction_batch(rng: random.Random, rows: int, *, first_id: int, vocab_size: int, bos_id: int, pad_id: int,
                    length: tuple[int, int] = (48, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of ``induction_row`` with lengths drawn from ``length``, collated (right padding)."""
    return collate([induction_row(rng, rng.randint(*length), first_id=first_id, vocab_size=vocab_size,
                                  bos_id=bos_id) for _ in range(rows)], pad_id)


def batches(source: Iterator[tuple[list[int], list[int]]], *, token_budget: int, pool: int, pad_id: int,
            seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of at most ``token_budget`` padded tokens: ``pool`` examples sorted by length, cut into
    batches, shuffled."""
    rng = random.Random(seed)
    while True:
        rows = sorted((next(source) for _ in range(pool)), key=lambda r: len(r[0]))
        groups: list[list[tuple[list[int], list[int]]]] = []
        current: list[tuple[list[int], list[int]]] = []
        for row in rows:
            if current and len(row[0]) * (len(current) + 1) > token_budget:
                groups.append(current)
                current = []
            current.append(row)
        if current:
            groups.append(current)
        rng.shuffle(groups)
        for group in groups:
            yield collate(group, pad_id)
