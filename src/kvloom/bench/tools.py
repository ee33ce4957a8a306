"""``python -m kvloom bench tools``: an agent workload with constrained tool calls vs the same
workload unconstrained.

Workload (``kvloom.bench.agent_workload``): a shop assistant's system prompt with 8 tools, held
as one prefix handle (``cache_prefix(messages=[system], tools=TOOLS)``), and
``--conversations`` (default 64) three-turn conversations, all started at once, each turn
streamed after the one before it ends:

1. the user's request, ``tool_choice="required"`` (one call, ``parallel_tool_calls`` off unless
   ``--parallel-tool-calls``), up to ``--call-max-tokens``;
2. the tool's result appended (a fixed JSON per call), ``tool_choice="auto"``, up to ``--answer-max-tokens``;
3. a follow-up user message, ``tool_choice="auto"``, up to ``--answer-max-tokens``.

Every turn samples (temperature 0.7, a seed per conversation and turn). The unconstrained run
replays the constrained run's transcripts: turn *k* of a conversation gets exactly the
messages the constrained run sent (tools still rendered, ``tool_choice="none"``: no grammar)
and generates exactly as many tokens (EOS ignored), so prompts, prefix-cache hits and batch
shapes match step by step and only the grammars differ. The ratio is constrained output
tokens/s over unconstrained output tokens/s. TTFT is measured per request from its
submission to its first streamed token. Both runs alternate ``--repeats`` times on fresh
engines (after an untimed warm-up conversation that also compiles the grammars) and the best
of each counts.

Validity: every complete call of every constrained turn must name one of the tools and carry
arguments that validate against its schema (``jsonschema``), and every first turn must end in
a call (``finish_reason="tool_calls"``); the exit status is non-zero otherwise. A call cut by
``max_tokens`` in an ``auto`` turn is counted as cut, not as invalid.

Default checkpoint: the standard ~155M random model with a 32,000-token tokenizer trained
locally, a Qwen / Hermes style chat template (``<tool_call>``) and 4,096 positions (the system
prompt with the tools is ~2,050 tokens with that tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvloom.bench.agent_workload import SCHEMAS, SYSTEM_PROMPT, TOOLS, first_turn, follow_up, tool_result
from kvloom.bench.extra import needs_bench_extra
from kvloom.bench.runner import System, add_quick, refuse, start, take_turns, write_result
from kvloom.bench.settings import add_kvloom_config, parse_config
from kvloom.bench.structured import STRUCTURED_MODEL
from kvloom.models.checkpoints import ModelSpec

SCHEMA_VERSION = 1
TOOLS_MODEL = ModelSpec(
    "bench-llama-155m-tok32k-hermes", "v1",
    {**STRUCTURED_MODEL.build_kwargs, "chat_template": "hermes", "max_position_embeddings": 4096},
)
"""The standard checkpoint's weights, a 32k-token tokenizer and a ``<tool_call>`` chat template."""

TURN_CHOICES = ("required", "auto", "auto")
"""``tool_choice`` of each of the three turns."""


@dataclass(slots=True)
class Turn:
    """One streamed request of a conversation: what it was sent and what came back."""

    messages: list[dict[str, Any]]
    """The request's messages (after the prefix handle's system prompt)."""
    num_tokens: int = 0
    ttft_s: float = float("nan")
    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI-shaped calls (``{"id", "type", "function": {"name", "arguments"}}``) from the streamed deltas."""
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Settings:
    call_max_tokens: int
    answer_max_tokens: int
    parallel: bool
    seed: int


async def _stream_turn(engine: Any, handle: Any, turn: Turn, params: Any, tool_choice: str, parallel: bool,
                       request_id: str) -> None:
    """Stream one request and fill ``turn`` in from its chunks."""
    from kvloom.engine.streams import merge_tool_deltas
    from kvloom.outputs import ToolCall, ToolCallDelta

    start = time.perf_counter()
    deltas: list[ToolCallDelta] = []
    async for chunk in engine.stream(messages=turn.messages, params=params, prefix=handle, tools=TOOLS,
                                     tool_choice=tool_choice, parallel_tool_calls=parallel, request_id=request_id):
        if chunk.token_ids and turn.num_tokens == 0:
            turn.ttft_s = time.perf_counter() - start
        turn.num_tokens += len(chunk.token_ids)
        turn.text += chunk.text
        deltas = merge_tool_deltas(deltas, chunk.tool_calls or [])
        if chunk.finish_reason is not None:
            turn.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            turn.cached_tokens = chunk.usage.cached_tokens
    # Each call's pieces are merged into one delta that carries its id, name and whole arguments.
    turn.tool_calls = [ToolCall(d.id or "", d.name or "", d.arguments).to_openai() for d in deltas]


def _after(turn: Turn, conversation: int) -> list[dict[str, Any]]:
    """The messages that follow ``turn``: the assistant's reply and, for each call, its result."""
    reply: dict[str, Any] = {"role": "assistant", "content": turn.text}
    if turn.tool_calls:
        reply["tool_calls"] = turn.tool_calls
    results = [{"role": "tool", "tool_call_id": c["id"], "content": tool_result(c["function"]["name"], conversation)}
               for c in turn.tool_calls]
    return [reply, *results]


async def _conversation(engine: Any, handle: Any, i: int, settings: Settings, replay: list[Turn] | None,
                        tag: str) -> list[Turn]:
    """Conversation ``i``'s three turns; with ``replay``, the same messages and lengths unconstrained."""
    from kvloom import SamplingParams

    turns: list[Turn] = []
    messages: list[dict[str, Any]] = [{"role": "user", "content": first_turn(i)}]
    for k, choice in enumerate(TURN_CHOICES):
        seed = settings.seed + 3 * i + k
        if replay is not None:
            turn = Turn(list(replay[k].messages))
            params = SamplingParams(temperature=0.7, seed=seed, ignore_eos=True, max_tokens=replay[k].num_tokens)
            choice = "none"
        else:
            turn = Turn(list(messages))
            limit = settings.call_max_tokens if k == 0 else settings.answer_max_tokens
            params = SamplingParams(temperature=0.7, seed=seed, max_tokens=limit)
        await _stream_turn(engine, handle, turn, params, choice, settings.parallel, f"{tag}-c{i}-t{k}")
        turns.append(turn)
        messages += _after(turn, i)
        if k == 1:
            messages.append({"role": "user", "content": follow_up(i)})
    return turns


async def _run(model_dir: Path, config: dict[str, Any], num: int, settings: Settings,
               replays: list[list[Turn]] | None) -> dict[str, Any]:
    """All conversations at once on a fresh engine; tokens/s, TTFTs, transcripts and stats.
    ``replays`` (``num + 1`` transcripts, the warm-up's last) makes the unconstrained run."""
    from kvloom import AsyncEngine

    async with AsyncEngine.from_pretrained(model_dir, **config) as engine:
        handle = await engine.cache_prefix(messages=[{"role": "system", "content": SYSTEM_PROMPT}], tools=TOOLS)
        # Warm-up outside the clock, conversation ``num`` (constrained: compiles the grammars;
        # replayed: the same conversation unconstrained, so no grammar runs in that engine).
        warmup = await _conversation(engine, handle, num, settings, replays[num] if replays else None, "warmup")
        start = time.perf_counter()
        conversations = await asyncio.gather(*(
            _conversation(engine, handle, i, settings, replays[i] if replays else None, "bench") for i in range(num)))
        wall = time.perf_counter() - start
        stats = engine.stats()
        handle.release()
    num_tokens = sum(t.num_tokens for conv in conversations for t in conv)
    return {"wall_s": wall, "output_tokens": num_tokens, "tokens_per_s": num_tokens / wall,
            "conversations": conversations, "warmup": warmup, "mask_ms_per_step": stats.logits_processor_ms_per_step,
            "ttft_s": _ttfts(conversations)}


def _ttfts(conversations: list[list[Turn]]) -> dict[str, float]:
    """TTFT p50 and mean over all requests, and p50 per turn."""
    every = [t.ttft_s for conv in conversations for t in conv]
    out = {"p50": statistics.median(every), "mean": statistics.fmean(every)}
    for k in range(len(TURN_CHOICES)):
        out[f"p50_turn{k + 1}"] = statistics.median(conv[k].ttft_s for conv in conversations)
    return out


def validity(conversations: list[list[Turn]]) -> dict[str, int]:
    """Counts over the constrained turns: first turns that ended in a call, calls complete and
    valid (allowed name, arguments valid against its schema), calls cut by ``max_tokens``."""
    with needs_bench_extra("bench tools' validity check"):
        import jsonschema

    counts = {"first_turns": len(conversations), "first_turn_calls": 0, "calls": 0, "valid": 0, "cut": 0}
    for conv in conversations:
        counts["first_turn_calls"] += conv[0].finish_reason == "tool_calls" and bool(conv[0].tool_calls)
        for turn in conv:
            for j, call in enumerate(turn.tool_calls):
                fn = call["function"]
                try:
                    args = json.loads(fn["arguments"])
                except ValueError:
                    if turn.finish_reason == "length" and j == len(turn.tool_calls) - 1:
                        counts["cut"] += 1
                        continue
                    args = None
                counts["calls"] += 1
                if fn["name"] in SCHEMAS and isinstance(args, dict):
                    try:
                        jsonschema.validate(args, SCHEMAS[fn["name"]])
                        counts["valid"] += 1
                    except jsonschema.ValidationError:
                        pass
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench tools``."""
    parser.add_argument("--model", type=Path,
                        help="HF checkpoint dir with a tokenizer and a tool-calling chat template "
                             "(default: a ~155M random one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--conversations", type=int, default=64, help="three-turn conversations, all at once")
    parser.add_argument("--call-max-tokens", type=int, default=256, help="max_tokens of the first (calling) turn")
    parser.add_argument("--answer-max-tokens", type=int, default=48, help="max_tokens of the second and third turns")
    parser.add_argument("--parallel-tool-calls", action="store_true", help="allow several calls per turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each system (alternating); best kept")
    add_kvloom_config(parser, "AsyncEngine settings, e.g. max_num_batched_tokens=1024")
    add_quick(parser)


def _row(name: str, res: dict[str, Any], valid: str) -> str:
    ttft = res["ttft_s"]
    mask = res["mask_ms_per_step"]
    return (f"{name:<30} {res['tokens_per_s']:>10.1f} {res['wall_s']:>8.1f} {res['output_tokens']:>8} "
            f"{ttft['p50']:>9.2f} {ttft['p50_turn1']:>7.2f} {ttft['p50_turn2']:>7.2f} {ttft['p50_turn3']:>7.2f} "
            f"{mask if mask is not None else float('nan'):>8.2f} {valid:>12}")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark; prints a table, the ratio and the calls' validity."""
    if args.conversations < 1 or args.call_max_tokens < 1 or args.answer_max_tokens < 1 or args.repeats < 1:
        return refuse("tools", "--conversations, --call-max-tokens, --answer-max-tokens and --repeats must be >= 1")
    bench = start("tools", argv, args.model, args.quick, TOOLS_MODEL)
    model_dir = bench.model_dir
    num = args.conversations
    config = {"dtype": "float32", "max_num_seqs": max(num, 1)} | parse_config(args.kvloom_config)
    settings = Settings(args.call_max_tokens, args.answer_max_tokens, args.parallel_tool_calls, args.seed)
    print(f"model: {model_dir}\nworkload: {num} three-turn conversations at once (tool_choice "
          f"{'/'.join(TURN_CHOICES)}), a system prompt with {len(TOOLS)} tools held as a prefix handle; max_tokens "
          f"{args.call_max_tokens} (call) / {args.answer_max_tokens} (answers); parallel_tool_calls "
          f"{args.parallel_tool_calls}; temperature 0.7 seeded; tools: kvloom/bench/agent_workload.py\n")

    def measure(replays: list[list[Turn]] | None) -> dict[str, Any]:
        return asyncio.run(_run(model_dir, config, num, settings, replays))

    first: list[dict[str, Any]] = []

    def constrained() -> dict[str, Any]:
        result = measure(None)
        if not first:
            first.append(result)
        return result

    def unconstrained() -> dict[str, Any]:  # replays the first constrained run's transcripts, warm-up last
        return measure([*first[0]["conversations"], first[0]["warmup"]])

    # Alternate the two systems and keep each one's best: this machine's speed drifts between runs.
    turns = take_turns([System("constrained", constrained), System("unconstrained", unconstrained)], args.repeats,
                       progress=None)
    constrained_runs, free_runs = turns.runs["constrained"], turns.runs["unconstrained"]
    transcripts: list[list[Turn]] = first[0]["conversations"]
    counts = [validity(r["conversations"]) for r in constrained_runs]
    res = max(constrained_runs, key=lambda r: r["tokens_per_s"])
    base = max(free_runs, key=lambda r: r["tokens_per_s"])
    total = {key: sum(c[key] for c in counts) for key in counts[0]}
    all_valid = total["valid"] == total["calls"] and total["first_turn_calls"] == total["first_turns"]

    print(f"{'system':<30} {'out tok/s':>10} {'wall s':>8} {'tokens':>8} {'TTFT p50':>9} {'turn 1':>7} "
          f"{'turn 2':>7} {'turn 3':>7} {'mask ms':>8} {'valid calls':>12}")
    print(_row("unconstrained, same lengths", base, "-"))
    print(_row("tools, constrained calls", res, f"{total['valid']}/{total['calls']}"), flush=True)
    ratio = res["tokens_per_s"] / base["tokens_per_s"]
    print(f"\nkvloom tools / unconstrained (same messages, same lengths): {ratio:.2f}x throughput; "
          f"TTFT p50 {res['ttft_s']['p50']:.2f} s vs {base['ttft_s']['p50']:.2f} s")
    print(f"first turns ending in a call: {total['first_turn_calls']}/{total['first_turns']}; calls valid "
          f"{total['valid']}/{total['calls']} (cut by max_tokens: {total['cut']}), over {len(constrained_runs)} "
          f"constrained run(s)")
    sample = transcripts[0]
    print("sample conversation (random weights: the grammar supplies the structure):")
    for k, turn in enumerate(sample):
        shown = json.dumps(turn.tool_calls[0]["function"]) if turn.tool_calls else repr(turn.text[:80])
        print(f"  turn {k + 1} ({TURN_CHOICES[k]}, {turn.num_tokens} tokens, {turn.finish_reason}, "
              f"{turn.cached_tokens} cached): {shown}")

    def summary(r: dict[str, Any]) -> dict[str, Any]:
        return {key: r[key] for key in ("wall_s", "output_tokens", "tokens_per_s", "mask_ms_per_step", "ttft_s")}

    write_result(args.json, {
        **bench.flat_envelope("tools", SCHEMA_VERSION), "conversations": num,
        "call_max_tokens": args.call_max_tokens, "answer_max_tokens": args.answer_max_tokens,
        "parallel_tool_calls": args.parallel_tool_calls, "ratio": ratio, "validity": total,
        "constrained": summary(res) | {"tokens_per_s_runs": [r["tokens_per_s"] for r in constrained_runs]},
        "unconstrained": summary(base) | {"tokens_per_s_runs": [r["tokens_per_s"] for r in free_runs]},
        "sample_conversation": [{"messages": t.messages, "text": t.text, "tool_calls": t.tool_calls,
                                 "finish_reason": t.finish_reason, "num_tokens": t.num_tokens,
                                 "cached_tokens": t.cached_tokens} for t in sample],
    })
    return 0 if all_valid else 1


if __name__ == "__main__":
    from kvloom.cli import main

    sys.exit(main(["bench", "tools", *sys.argv[1:]]))
