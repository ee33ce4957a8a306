"""``python -m kvloom bench single``: a few users at a time on one machine: kvloom's ``generate`` and
``stream``, in float and in int8, and llama.cpp where it is installed, on one checkpoint and one set of
prompts, taking turns.

Systems (``--systems``, comma separated; each runs at every ``--streams`` count):

- ``generate``, ``stream``: kvloom in ``--dtype`` (``auto``: float32, or bf16 on CPUs with bf16 units),
  ``LLM.generate`` with every prompt in one call, and ``AsyncEngine.stream`` with one consumer task per
  prompt on one event loop (the loop runs on this thread; the engine steps on its own thread).
- ``generate-int8``, ``stream-int8``: the same with ``quantization="int8"``.
- ``llamacpp-<NAME>``: llama.cpp through ``llama-cpp-python`` (a ``bench`` peer only, never a runtime
  dependency) on the GGUF file ``--gguf NAME=PATH`` names (convert the same checkpoint with llama.cpp's
  ``convert_hf_to_gguf.py --outtype f32|f16|q8_0``); token ids go in directly, so tokenizers do not
  matter. One stream only (its Python API decodes one sequence); where it is not installed, or at more
  streams, the result says so instead of a number.

Per pass at ``C`` streams (``C`` prompts of ``--prompt-len`` random token ids, ``--output-len`` greedy
tokens each, EOS ignored), from the pass's start: ``first`` (when every stream has its first token) and
``end`` (the last token)::

    prefill tokens/s = C x prompt_len / first
    decode tokens/s  = C x (output_len - 1) / (end - first)

``--rounds`` rounds, every system once a round in the order given (A B C A B C), medians reported.
Each system gets an untimed pass first. Weight bandwidth: the bytes of the linear weights and the LM
head a decode step reads (4 a weight in float32, 2 in bf16, 1 in int8 plus a scale per channel) times
steps per second, beside the machine's copy bandwidth measured at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvloom.bench.analysis.roofline import DecodeShape
from kvloom.bench.runner import System, add_quick, refuse, rounded_median, start, take_turns, write_result
from kvloom.bench.workload import Workload, read_vocab_size

SCHEMA_VERSION = 1
KVLOOM_SYSTEMS = ("generate", "stream", "generate-int8", "stream-int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench single``."""
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: the standard ~155M random checkpoint)")
    parser.add_argument("--systems", default="generate,stream,generate-int8,stream-int8",
                        help="comma separated: generate, stream, generate-int8, stream-int8, llamacpp-<NAME>")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH",
                        help="a GGUF file of the same checkpoint for llamacpp-<NAME> (repeatable)")
    parser.add_argument("--streams", default="1,4,16", help="concurrent streams, comma separated")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every system, interleaved; medians reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    add_quick(parser)


@dataclass(slots=True)
class Pass:
    """One pass at ``C`` streams: seconds from its start, and the tokens."""

    first_s: float
    end_s: float
    token_ids: list[list[int]]


def parse_streams(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",")})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise ValueError(f"--streams: expected positive integers, comma separated; got {text!r}")
    return values


def parse_systems(text: str, gguf: dict[str, Path]) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--systems: expected distinct names, comma separated; got {text!r}")
    for name in names:
        if name.startswith("llamacpp-"):
            if name.removeprefix("llamacpp-") not in gguf:
                raise ValueError(f"--systems: {name} needs --gguf {name.removeprefix('llamacpp-')}=PATH")
        elif name not in KVLOOM_SYSTEMS:
            raise ValueError(f"--systems: {name!r} is not one of {', '.join(KVLOOM_SYSTEMS)} or llamacpp-<NAME>")
    return names


def parse_gguf(items: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"--gguf: expected NAME=PATH of an existing file, got {item!r}")
        out[name] = Path(path)
    return out


class KvloomGenerate:
    """``LLM.generate`` with every prompt in one call."""

    def __init__(self, model_dir: Path, config: dict[str, Any], output_len: int) -> None:
        import kvloom

        self.llm = kvloom.LLM(model_dir, **config)
        self.params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def describe(self) -> dict[str, str]:
        choice, (weights, why) = self.llm.dtype_choice, self.llm.weight_layout
        return {"dtype": choice.name, "dtype_reason": choice.reason, "weights": weights, "weights_reason": why}

    def run(self, prompts: list[list[int]]) -> Pass:
        done = self.llm.generate(prompts, self.params, use_tqdm=False)
        first = [c.usage.time_to_first_token for c in done]
        end = [c.usage.total_time for c in done]
        if any(t is None for t in first + end):
            raise RuntimeError("a completion came back without its first-token or total time")
        return Pass(max(t for t in first if t is not None), max(t for t in end if t is not None),
                    [list(c.token_ids) for c in done])


class KvloomStream:
    """``AsyncEngine.stream``: one consumer task per prompt, clocked as the consumer sees its chunks."""

    def __init__(self, model_dir: Path, config: dict[str, Any], output_len: int) -> None:
        import kvloom

        self.loop = asyncio.new_event_loop()
        self.engine = kvloom.AsyncEngine.from_pretrained(model_dir, **config)
        self.loop.run_until_complete(self.engine.start())
        self.params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def describe(self) -> dict[str, str]:
        stats = self.engine.stats()
        return {"dtype": str(stats.dtype), "dtype_reason": str(stats.dtype_reason), "weights": str(stats.weights),
                "weights_reason": str(stats.weights_reason)}

    def run(self, prompts: list[list[int]]) -> Pass:
        return self.loop.run_until_complete(self._run(prompts))

    async def _run(self, prompts: list[list[int]]) -> Pass:
        start = time.perf_counter()

        async def one(prompt: list[int]) -> tuple[float, float, list[int]]:
            first: float | None = None
            tokens: list[int] = []
            async for chunk in self.engine.stream(prompt, self.params):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - start
                tokens.extend(chunk.token_ids)
            assert first is not None
            return first, time.perf_counter() - start, tokens

        done = await asyncio.gather(*(one(p) for p in prompts))
        return Pass(max(d[0] for d in done), max(d[1] for d in done), [d[2] for d in done])

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.aclose())
        self.loop.close()


class LlamaCpp:
    """llama.cpp through llama-cpp-python, one stream: token ids in, greedy tokens out."""

    def __init__(self, gguf: Path, context: int, output_len: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_threads=2, n_batch=512, verbose=False)
        self.output_len = output_len

    def run(self, prompts: list[list[int]]) -> Pass:
        if len(prompts) != 1:
            raise RuntimeError("llama-cpp-python decodes one stream; run llama-server for more")
        self.llm.reset()
        start = time.perf_counter()
        first = 0.0
        tokens: list[int] = []
        for token in self.llm.generate(prompts[0], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not tokens:
                first = time.perf_counter() - start
            tokens.append(int(token))
            if len(tokens) == self.output_len:
                break
        return Pass(first, time.perf_counter() - start, [tokens])


def _rates(passes: list[Pass], c: int, prompt_len: int, output_len: int) -> dict[str, float | None]:
    prefill = [c * prompt_len / p.first_s for p in passes]
    decode = [c * (output_len - 1) / (p.end_s - p.first_s) for p in passes if p.end_s > p.first_s]
    return {"prefill_tokens_per_s": rounded_median(prefill, 1) if prefill else None,
            "decode_tokens_per_s": rounded_median(decode, 2) if decode else None}


def weight_bytes(shape: DecodeShape, config: dict[str, Any], dtype: str, int8: bool) -> int:
    """Bytes of linear weights (and the LM head) one decode step reads."""
    if int8:
        layers = int(config["num_hidden_layers"])
        hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        channels = layers * ((heads + 2 * kv_heads) * head_dim + hidden + 2 * inter + hidden) + int(config["vocab_size"])
        return shape.weight_params + 4 * channels
    return shape.weight_params * (2 if dtype in ("bfloat16", "float16") else 4)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark: 0 when it ran (a peer's failure is reported in the results), 2 on bad flags."""
    try:
        gguf = parse_gguf(args.gguf)
        names = parse_systems(args.systems, gguf)
        streams = parse_streams(args.streams)
        if args.prompt_len < 1 or args.output_len < 2 or args.rounds < 1:
            raise ValueError("--prompt-len must be >= 1, --output-len >= 2, --rounds >= 1")
    except ValueError as exc:
        return refuse("single", exc)
    bench = start("single", argv, args.model, args.quick)
    model_dir = bench.model_dir
    config = json.loads((model_dir / "config.json").read_text())
    shape = DecodeShape.from_config(config)
    vocab = read_vocab_size(model_dir)
    prompts = {c: Workload(c, args.prompt_len, args.prompt_len, args.output_len, args.seed).prompts(vocab) for c in streams}
    print(f"model: {model_dir} ({shape.weight_params / 1e6:.1f}M weights read a decode step)\nworkload: "
          f"{','.join(map(str, streams))} streams; prompts of {args.prompt_len} random token ids, {args.output_len} "
          f"greedy tokens each, EOS ignored; {args.rounds} rounds, systems taking turns: {', '.join(names)}")
    # Prefix caching off: every pass computes its prompts, as the peers do.
    kv_config = {"dtype": args.dtype, "enable_prefix_caching": False, "max_num_seqs": max(16, max(streams)),
                 "num_kv_blocks": max(streams) * (-(-(args.prompt_len + args.output_len) // 16) + 1)}
    systems: dict[str, Any] = {}
    errors: dict[str, str | None] = {}
    for name in names:
        try:
            if name.startswith("llamacpp-"):
                systems[name] = LlamaCpp(gguf[name.removeprefix("llamacpp-")], args.prompt_len + args.output_len + 8,
                                         args.output_len)
            else:
                cls = KvloomStream if name.startswith("stream") else KvloomGenerate
                systems[name] = cls(model_dir, kv_config | ({"quantization": "int8"} if name.endswith("int8") else {}),
                                    args.output_len)
            errors[name] = None
        except Exception as exc:
            if not name.startswith("llamacpp-"):
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"
    results = []
    for c in streams:
        runnable = [n for n in names if errors[n] is None and (c == 1 or not n.startswith("llamacpp-"))]
        for n in runnable:  # an untimed pass each
            systems[n].run(prompts[c])
        contenders = [System(n, _bound(systems[n].run, prompts[c]), fallible=n.startswith("llamacpp-")) for n in runnable]
        turns = take_turns(contenders, args.rounds, progress=f"  {c} streams, round {{rep}}: {{name}} ...")
        reference = turns.runs[runnable[0]][0].token_ids if runnable and turns.runs[runnable[0]] else None
        entries = []
        for n in names:
            passes = turns.runs.get(n, [])
            error = errors[n] or turns.errors.get(n) or (None if n in runnable else "one stream only (llama-cpp-python)")
            entry: dict[str, Any] = {"name": n, "error": error, **(_rates(passes, c, args.prompt_len, args.output_len)
                                                                  if passes else {})}
            if passes and reference is not None:
                got = passes[0].token_ids
                same = sum(a == b for ra, rb in zip(reference, got, strict=True) for a, b in zip(ra, rb, strict=False))
                entry["tokens_equal_to_first_system"] = round(same / sum(len(r) for r in reference), 4)
            if passes and not n.startswith("llamacpp-") and entry.get("decode_tokens_per_s"):
                desc = systems[n].describe()
                bytes_step = weight_bytes(shape, config, desc["dtype"], n.endswith("int8"))
                entry["weight_gbps"] = round(bytes_step * entry["decode_tokens_per_s"] / c / 1e9, 2)
            entries.append(entry)
        results.append({"streams": c, "systems": entries})
    described = {n: systems[n].describe() for n in names if n in systems and not n.startswith("llamacpp-")}
    for system in systems.values():
        if isinstance(system, KvloomStream):
            system.close()
    result = bench.envelope("single", SCHEMA_VERSION)
    result |= {"workload": {"streams": streams, "prompt_len": args.prompt_len, "output_len": args.output_len,
                            "rounds": args.rounds, "seed": args.seed, "systems": names,
                            "gguf": {k: str(v) for k, v in gguf.items()}},
               "kvloom": described, "results": results}
    print(format_report(result, bench.ceilings.get("copy_gbps")))
    write_result(args.json, result)
    return 0


def _bound(fn: Callable[[list[list[int]]], Pass], prompts: list[list[int]]) -> Callable[[], Pass]:
    return lambda: fn(prompts)


def format_report(result: dict[str, Any], copy_gbps: float | None) -> str:
    """The table: per streams count, each system's prefill and decode tokens/s, its decode against the first
    system's, and the weight bandwidth it reached."""
    lines = [f"{n}: {d['dtype']}, weights {d['weights']} ({d['weights_reason']})" for n, d in result["kvloom"].items()]
    copy = f" (copy bandwidth {copy_gbps:.1f} GB/s)" if copy_gbps else ""
    lines.append(f"{'streams':>7}  {'system':<18} {'prefill tok/s':>13} {'decode tok/s':>12} {'x first':>8} "
                 f"{'weights GB/s':>12}{copy}  same tokens")
    for at in result["results"]:
        base = next((e.get("decode_tokens_per_s") for e in at["systems"] if e.get("decode_tokens_per_s")), None)
        for e in at["systems"]:
            decode = e.get("decode_tokens_per_s")
            if e.get("error") and not decode:
                lines.append(f"{at['streams']:>7}  {e['name']:<18} {e['error']}")
                continue
            ratio = f"{decode / base:.2f}" if decode and base else "-"
            gbps = e.get("weight_gbps")
            lines.append(f"{at['streams']:>7}  {e['name']:<18} {e.get('prefill_tokens_per_s') or '-':>13} "
                         f"{decode or '-':>12} {ratio:>8} {gbps if gbps is not None else '-':>12}  "
                         f"{e.get('tokens_equal_to_first_system', '-')}")
    return "\n".join(lines)
