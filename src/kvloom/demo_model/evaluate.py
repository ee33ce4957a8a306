"""``python -m kvloom eval-demo-model``: the demo model on the held-out split, through the engine.

Every figure comes from greedy generations of kvloom itself (``AsyncEngine``, all requests in
flight at once) on held-out examples, whose names, tool names and values the training split never
contains (``kvloom.demo_model.words.split_of``):

- ``qa``: the reply contains the passage's span that answers the question;
- ``tool choice`` / ``tool call``: the model calls the expected tool (``tool_choice="auto"``), and with
  exactly the expected arguments;
- ``no tool``: with tools listed but none fitting, it answers in text;
- ``tool answer``: given the tool's result, the reply contains the value it returned;
- ``json valid`` / ``json exact``: the reply to an extraction request parses as a JSON object / equals
  the record; ``json valid (grammar)`` / ``json exact (grammar)`` the same with the record's schema as
  ``response_format``;
- ``code edit``, ``summary``: the reply holds the edited function / the key sentences exactly;
- ``copied``: the share of reply tokens inside a 4-token run that also occurs in the prompt
  (what prompt-lookup speculation can predict);
- ``perplexity``: ``exp`` of the mean loss per reply token, teacher-forced (transformers' forward on
  the same checkpoint: the engine samples, it does not score).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvloom.demo_model.corpus import Example, generate

DEFAULT_SEED = 20261207
"""Held-out examples are drawn from this seed (the training run's own held-out check uses another)."""


@dataclass
class Report:
    """Counts per metric (``hits[name] / totals[name]``), perplexity and the copy share."""

    hits: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    perplexity: float = float("nan")
    copied: float = float("nan")
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def add(self, metric: str, ok: bool) -> None:
        self.hits[metric] = self.hits.get(metric, 0) + int(ok)
        self.totals[metric] = self.totals.get(metric, 0) + 1

    def rate(self, metric: str) -> float:
        return self.hits[metric] / self.totals[metric]

    def table(self) -> str:
        """A markdown table: metric, correct / total, percent."""
        lines = ["| held-out metric | correct | rate |", "|---|---:|---:|"]
        for metric in self.totals:
            lines.append(f"| {metric} | {self.hits[metric]} / {self.totals[metric]} | {100 * self.rate(metric):.1f}% |")
        lines.append(f"| reply tokens copied from the prompt (4-token runs) | | {100 * self.copied:.1f}% |")
        lines.append(f"| perplexity per reply token | | {self.perplexity:.3f} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"rates": {m: self.rate(m) for m in self.totals}, "hits": self.hits, "totals": self.totals,
                "perplexity": self.perplexity, "copied": self.copied}


def heldout(task: str, count: int, seed: int) -> list[Example]:
    rng = random.Random(f"{seed}-{task}")
    return [generate(task, rng, "heldout") for _ in range(count)]


def _json_schema(record: dict[str, Any]) -> dict[str, Any]:
    props = {k: {"type": "integer" if isinstance(v, int) else "string"} for k, v in record.items()}
    return {"type": "object", "properties": props, "required": list(record), "additionalProperties": False}


def _copied_share(prompt: Sequence[int], reply: Sequence[int], n: int = 4) -> tuple[int, int]:
    """(reply tokens inside an ``n``-gram that also occurs in ``prompt``, reply tokens)."""
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    covered = [False] * len(reply)
    for i in range(len(reply) - n + 1):
        if tuple(reply[i:i + n]) in grams:
            for j in range(i, i + n):
                covered[j] = True
    return sum(covered), len(reply)


def _perplexity(model_dir: Path, examples: list[Example]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvloom.demo_model.data import collate, encode

    auto_model: Any = AutoModelForCausalLM  # untyped API
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = auto_model.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [encode(e, tokenizer) for e in examples]
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            ids, mask = collate(rows[start:start + 16], 2)
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="none").view_as(mask[:, :-1])
            total += float((loss * mask[:, :-1]).sum())
            count += float(mask[:, :-1].sum())
    return math.exp(total / count)


async def _evaluate(engine: Any, per_task: int, seed: int, report: Report) -> None:
    from kvloom import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=160)
    copied = [0, 0]
    tokenizer = engine.tokenizer

    async def reply(example: Example, params: SamplingParams = greedy) -> Any:
        """The engine's reply to ``example`` without its last (assistant) turn."""
        return await engine.generate(messages=example.messages[:-1], params=params, tools=example.tools)

    def track(example: Example, completion: Any) -> None:
        encoded = tokenizer.apply_chat_template(example.messages[:-1], tools=example.tools, tokenize=True,
                                                add_generation_prompt=True, return_dict=True)
        prompt_ids = [int(t) for t in encoded["input_ids"]]
        got, total = _copied_share(prompt_ids, list(completion.token_ids))
        copied[0] += got
        copied[1] += total

    def sample(metric: str, example: Example, text: str) -> None:
        report.samples.setdefault(metric, [])
        if len(report.samples[metric]) < 3:
            report.samples[metric].append({"prompt": example.messages[-2]["content"] or "", "reply": text})

    qa = heldout("qa", per_task, seed)
    for example, completion in zip(qa, await asyncio.gather(*(reply(e) for e in qa)), strict=True):
        report.add("qa (exact span)", example.answer is not None and example.answer in completion.text)
        track(example, completion)
        sample("qa", example, completion.text)

    calls = heldout("tool_call", per_task, seed)
    for example, completion in zip(calls, await asyncio.gather(*(reply(e) for e in calls)), strict=True):
        assert example.call is not None
        made = completion.tool_calls
        name_ok = len(made) == 1 and made[0].name == example.call["name"]
        args_ok = False
        if name_ok and not made[0].incomplete:
            try:
                args_ok = made[0].parsed == example.call["arguments"]
            except ValueError:
                args_ok = False
        report.add("tool choice", name_ok)
        report.add("tool call (choice and arguments)", args_ok)
        track(example, completion)
        sample("tool call", example, json.dumps([c.to_openai()["function"] for c in made]) or completion.text)

    loops = [e for e in heldout("tool_loop", 2 * per_task, seed) if e.answer is not None][:per_task]
    for example, completion in zip(loops, await asyncio.gather(*(reply(e) for e in loops)), strict=True):
        report.add("tool answer (reply holds the tool's result)", str(example.answer) in completion.text)
        track(example, completion)

    nones = heldout("tool_none", per_task, seed)
    for completion in await asyncio.gather(*(reply(e) for e in nones)):
        report.add("no tool fits: answers in text", not completion.tool_calls and bool(completion.text.strip()))

    extractions = heldout("json", per_task, seed)
    plain = await asyncio.gather(*(reply(e) for e in extractions))
    constrained = await asyncio.gather(*(
        reply(e, SamplingParams(temperature=0.0, max_tokens=160,
                                response_format={"type": "json_schema", "json_schema": {"name": "record",
                                                                                       "schema": _json_schema(e.record or {})}}))
        for e in extractions))
    for label, completions in (("", plain), (" (grammar)", constrained)):
        for example, completion in zip(extractions, completions, strict=True):
            try:
                value = json.loads(completion.text)
            except ValueError:
                value = None
            report.add(f"json valid{label}", isinstance(value, dict))
            report.add(f"json exact{label}", value == example.record)
            if not label:
                track(example, completion)
                sample("json", example, completion.text)

    for task, metric in (("code_edit", "code edit (whole function exact)"), ("summary", "summary (key sentences exact)")):
        items = heldout(task, per_task // 2, seed)
        params = SamplingParams(temperature=0.0, max_tokens=300)
        for example, completion in zip(items, await asyncio.gather(*(reply(e, params) for e in items)), strict=True):
            report.add(metric, example.answer is not None and example.answer in completion.text)
            track(example, completion)
            sample(task, example, completion.text)
    report.copied = copied[0] / max(1, copied[1])


def evaluate(model_dir: Path, *, per_task: int = 100, seed: int = DEFAULT_SEED, perplexity: bool = True,
             **engine_config: Any) -> Report:
    """Run every metric on ``per_task`` held-out examples per task with a fresh engine on ``model_dir``."""
    from kvloom import AsyncEngine

    report = Report()

    async def main() -> None:
        async with AsyncEngine.from_pretrained(model_dir, **engine_config) as engine:
            await _evaluate(engine, per_task, seed, report)

    asyncio.run(main())
    if perplexity:
        tasks = ("qa", "tool_call", "tool_loop", "json", "code_edit", "summary", "story")
        report.perplexity = _perplexity(model_dir, [e for t in tasks for e in heldout(t, per_task // 2, seed + 1)])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom eval-demo-model``."""
    parser.add_argument("--model", type=Path, required=True,
                        help="a checkpoint directory written by python -m kvloom.demo_model.train")
    parser.add_argument("--per-task", type=int, default=100, help="held-out examples per task (default 100)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", choices=["int8"], default=None,
                        help="run the engine with this quantization, and compare its model with float32 "
                             "teacher-forced (top-1 agreement, perplexity)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                        help="the engine's KV cache; int8 is also compared with float32 teacher-forced, on single "
                             "chats and on 10 chats back to back (prompts over 1,000 tokens)")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Evaluate and print the table."""
    if args.per_task < 2:
        print("eval-demo-model: --per-task must be >= 2", file=sys.stderr)
        return 2
    model_dir = args.model
    started = time.perf_counter()
    quantized = args.quantization is not None or args.kv_cache_dtype != "auto"
    report = evaluate(model_dir, per_task=args.per_task, seed=args.seed, dtype=args.dtype,
                      quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, perplexity=not quantized)
    agreements: dict[str, Any] = {}
    if quantized:
        from kvloom.demo_model.agreement import measure

        tasks = ("qa", "tool_call", "tool_loop", "json", "code_edit", "summary", "story")
        examples = [e for t in tasks for e in heldout(t, args.per_task // 2, args.seed + 1)]
        random.Random(args.seed).shuffle(examples)
        what = " + ".join([*([f"{args.quantization} weights"] if args.quantization else []),
                           *([f"{args.kv_cache_dtype} KV"] if args.kv_cache_dtype != "auto" else [])])
        agreements[what] = measure(model_dir, examples, args.quantization, args.kv_cache_dtype)
        report.perplexity = agreements[what].quantized_perplexity  # the table's row is the quantized model's own
        if args.kv_cache_dtype != "auto":
            agreements[f"{what}, 10 chats a sequence"] = measure(model_dir, examples, args.quantization,
                                                                 args.kv_cache_dtype, join=10)
    settings = "".join([f", quantization={args.quantization!r}" if args.quantization else "",
                        f", kv_cache_dtype={args.kv_cache_dtype!r}" if args.kv_cache_dtype != "auto" else ""])
    print(f"held-out evaluation of {model_dir} ({args.per_task} examples per task, seed {args.seed}, dtype "
          f"{args.dtype}{settings}, {time.perf_counter() - started:.0f} s)\n")
    print(report.table())
    for what, agreement in agreements.items():
        print(f"\n{agreement.line(what)}")
    for task, items in report.samples.items():
        print(f"\n{task}, first held-out replies:")
        for item in items[:2]:
            print(f"  > {item['prompt'].splitlines()[-1][:100]}\n    {item['reply'][:200]!r}")
    if args.json:
        figures = report.to_json()
        figures["against_float32"] = {
            what: {"positions": a.positions, "top1_agreement": a.top1_agreement, "float_perplexity": a.float_perplexity,
                   "quantized_perplexity": a.quantized_perplexity} for what, a in agreements.items()}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0
