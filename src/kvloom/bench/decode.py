"""``python -m kvloom bench decode``: decode throughput at several concurrencies, kvloom vs
transformers, against the memory-bandwidth roofline (``analysis.roofline``).

The model: ``workload.DECODE_MODEL_1B`` (TinyLlama-1.1B's shape, random bf16 weights) by default,
``--size standard`` the ~155M CPU checkpoint, ``--model DIR`` any checkpoint. kvloom runs on
``--device`` in ``--dtype`` (``auto``: its own choice, the checkpoint's dtype on a GPU); the
transformers peers run on the same device, in the dtype kvloom resolved to.

At each concurrency ``C``: ``C`` prompts of ``--prompt-len`` random token ids (seeded), all
submitted at once, each generating exactly ``--output-len`` tokens (greedy, EOS ignored). Per
system and pass, from the pass's start: ``all_first`` (when every request has its first token)
and ``end`` (the last token), and::

    decode tokens/s = C x (output_len - 1) / (end - all_first)
    output tokens/s = C x output_len / wall

Timestamps: kvloom, each request's ``usage`` (first token, end; from its arrival in ``generate``);
``static`` (transformers ``generate``, one batch of ``C``), the first-token clock of ``peers``
(all requests get theirs together) and the wall; ``cb`` (transformers continuous batching,
``max_batch_tokens`` = kvloom's ``max_num_batched_tokens``, at least ``C``; ``cb<T>`` sets it),
``peers.serve_cb`` with every request at offset 0: a warmed-up manager, transformers' own
per-token timestamps. Every system gets one untimed pass at the smallest ``C`` first; passes are
interleaved (kvloom, static, cb, then again with ``--repeats``), medians reported.

Start-up: ``LLM(...)`` construction (load, KV allocation, CUDA graph capture where kvloom does it;
the CUDA context already exists: the bandwidth was measured first), against 30 s on a GPU.
Printed and written as JSON: the command, the machine, the bandwidth, per ``C`` each system's
numbers, kvloom's % of the roofline and its ratio to the best transformers configuration, and
greedy-token agreement with kvloom (float32: every request must agree; bf16: near-ties may flip).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from kvloom.bench import machine
from kvloom.bench.analysis.roofline import DecodeShape, decode_tokens_per_s, roofline
from kvloom.bench.decode_report import format_report, summarize
from kvloom.bench.peers import PeerSpec, load_hf_models, parse_peers, run_peer, serve_cb
from kvloom.bench.runner import (
    System,
    add_quick,
    attempt,
    refuse,
    rounded_median,
    start,
    take_turns,
    write_result,
)
from kvloom.bench.settings import add_kvloom_config, kvloom_config, parse_config
from kvloom.bench.workload import Workload, read_vocab_size
from kvloom.models.checkpoints import DECODE_MODEL_1B, STANDARD_MODEL

SCHEMA_VERSION = 1
SIZES = {"1b": DECODE_MODEL_1B, "standard": STANDARD_MODEL}
LEAD_S = 0.05
"""``cb``: the clock starts this long before the requests are submitted (``serve_cb``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench decode``."""
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: --size's random checkpoint)")
    parser.add_argument("--size", choices=list(SIZES), default="1b",
                        help="random checkpoint: 1b (TinyLlama-1.1B shape, bf16; default) or standard (~155M)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="kvloom's dtype (auto: its own choice); the peers run in what it resolves to")
    parser.add_argument("--concurrency", default="1,8,64,256", help="requests at once, comma separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
    parser.add_argument("--peers", default="static,cb", help="static (generate, batch = concurrency), cb "
                        "(continuous batching), cb<T>[r<R>] (max_batch_tokens T), comma separated; '' for none")
    parser.add_argument("--repeats", type=int, default=1, help="passes per system, interleaved; medians are reported")
    parser.add_argument("--json", type=Path, help="write the results here")
    add_kvloom_config(parser, "LLM(...) settings, e.g. max_num_batched_tokens=4096 block_size=16")
    add_quick(parser)


def parse_concurrency(text: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]`` (sorted, each once); anything but positive integers is an error."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--concurrency: expected positive integers, comma separated; got {text!r}")
    return sorted(set(values))


def parse_decode_peers(text: str) -> list[str]:
    """``"static,cb,cb4096"`` -> the names; ``''`` -> none. ``cb<T>[r<R>]`` is checked by ``parse_peers``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name != "static" and name != "cb" and (not name.startswith("cb") or "@" in name or not parse_peers(name)):
            raise ValueError(f"--peers: {name!r} is not static, cb or cb<T>[r<R>] (the dtype is kvloom's)")
    if len(set(names)) != len(names):
        raise ValueError("--peers: a peer is given twice")
    return names


def peer_spec(name: str, concurrency: int, dtype: str, budget: int) -> PeerSpec:
    """The transformers configuration ``name`` runs at ``concurrency``: ``static`` one batch of all,
    ``cb`` a token budget of ``max(budget, concurrency)`` (a decode step holds every request)."""
    if name == "static":
        return PeerSpec(f"static{concurrency}", "static", batch_size=concurrency, dtype=dtype)
    if name == "cb":
        tokens = max(budget, concurrency)
        return PeerSpec(f"cb{tokens}", "cb", max_batch_tokens=tokens, dtype=dtype)
    return replace(parse_peers(name)[0], dtype=dtype)


def resolve_device(name: str) -> str:
    """``auto``: cuda where torch sees a GPU, else cpu (as kvloom decides); ``cuda`` must exist."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device")
    return name


@dataclass(slots=True)
class Pass:
    """One system's pass at one concurrency; seconds from the pass's start."""

    wall_s: float
    first_s: list[float]
    """Each request's first token."""
    end_s: float
    """The last token."""
    token_ids: list[list[int]]


class _Kvloom:
    """kvloom as a benchmarked system: one ``LLM`` (construction timed), one ``generate`` a pass."""

    def __init__(self, model_dir: Path, config: dict[str, Any], output_len: int) -> None:
        import kvloom

        start = time.perf_counter()
        self.llm = kvloom.LLM(model_dir, **config)
        self.startup_s = time.perf_counter() - start
        self.params = kvloom.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def run(self, prompts: list[list[int]]) -> Pass:
        self.llm.reset_prefix_cache()  # every pass computes its prompts, as the peers do
        start = time.perf_counter()
        completions = self.llm.generate(prompts, self.params, use_tqdm=False)
        wall = time.perf_counter() - start
        first = [c.usage.time_to_first_token for c in completions]
        ends = [c.usage.total_time for c in completions]
        if any(t is None for t in first + ends):
            raise RuntimeError("kvloom returned a completion without its first-token or total time")
        return Pass(wall, [t for t in first if t is not None], max(t for t in ends if t is not None),
                    [list(c.token_ids) for c in completions])


def run_transformers(spec: PeerSpec, model: Any, prompts: list[list[int]], output_len: int) -> Pass:
    """One pass of a peer: ``static`` through ``run_peer``, ``cb`` through ``serve_cb`` (all at offset 0)."""
    if spec.kind == "static":
        run = run_peer(spec, model, prompts, output_len)
        return Pass(run.wall_s, run.ttft_s or [run.wall_s] * len(prompts), run.wall_s, run.token_ids)
    traces = serve_cb(spec, model, prompts, [0.0] * len(prompts), output_len, LEAD_S)
    start = traces[0].arrival
    end = max(t.end for t in traces) - start
    return Pass(end, [t.first_token - start for t in traces], end, [t.token_ids for t in traces])


def system_entry(name: str, spec: PeerSpec | None, runs: list[Pass], error: str | None, concurrency: int,
                 output_len: int, reference: list[list[int]] | None) -> dict[str, Any]:
    """A system's numbers at one concurrency (medians over passes) and its agreement with ``reference``;
    ``spec``: the transformers configuration it ran as (None: kvloom)."""
    entry: dict[str, Any] = {"name": name, "config": spec.name if spec else name,
                             "description": spec.describe() if spec else "kvloom LLM.generate", "error": error}
    if error is not None or not runs:
        return entry | {"decode_tokens_per_s": None, "output_tokens_per_s": None, "wall_s": None,
                        "all_first_token_s": None, "first_token_min_s": None, "matches_kvloom": None, "runs": []}
    med = rounded_median
    all_first = [max(r.first_s) for r in runs]
    rates = [decode_tokens_per_s(concurrency, output_len, r.end_s, first) for r, first in zip(runs, all_first, strict=True)]
    decode = [rate for rate in rates if rate is not None]
    mismatched = ([i for i, (a, b) in enumerate(zip(reference, runs[0].token_ids, strict=True)) if a != b]
                  if reference is not None else [])
    return entry | {
        "decode_tokens_per_s": med(decode, 2) if decode else None,
        "output_tokens_per_s": med([concurrency * output_len / r.wall_s for r in runs], 2),
        "wall_s": med([r.wall_s for r in runs], 4), "all_first_token_s": med(all_first, 4),
        "first_token_min_s": med([min(r.first_s) for r in runs], 4),
        "output_lens_ok": all(len(t) == output_len for t in runs[0].token_ids),
        "matches_kvloom": None if reference is None else concurrency - len(mismatched),
        "mismatched_requests": mismatched[:20],
        "runs": [{"wall_s": round(r.wall_s, 4), "all_first_token_s": round(first, 4),
                  "first_token_min_s": round(min(r.first_s), 4), "end_s": round(r.end_s, 4),
                  "decode_tokens_per_s": None if rate is None else round(rate, 2)}
                 for r, first, rate in zip(runs, all_first, rates, strict=True)],
    }


def measure(kv: _Kvloom, specs: dict[str, PeerSpec], model: Any, errors: dict[str, str | None],
            prompts: list[list[int]], output_len: int, repeats: int) -> list[dict[str, Any]]:
    """kvloom and each peer that has not failed (``errors``), interleaved ``repeats`` times over
    ``prompts``: their entries, kvloom's first; a peer failing here is skipped for the later passes."""
    c = len(prompts)
    contenders = [System("kvloom", partial(kv.run, prompts))] + [
        System(n, partial(run_transformers, spec, model, prompts, output_len), fallible=True, label=spec.name)
        for n, spec in specs.items()]
    turns = take_turns(contenders, repeats, errors=errors, progress=f"  concurrency {c}, pass {{rep}}: {{name}} ...")
    runs, at_c = turns.runs, turns.errors
    reference = runs["kvloom"][0].token_ids
    return [system_entry("kvloom", None, runs["kvloom"], None, c, output_len, None),
            *(system_entry(n, spec, runs[n], at_c[n], c, output_len, reference) for n, spec in specs.items())]


def measure_bandwidth(device: str, ceilings: dict[str, float]) -> dict[str, Any]:
    """The roofline's bandwidth: on CUDA a device copy measured now (``machine.measure_device_bandwidth``),
    on CPU the copy ceiling ``machine.measure_ceilings`` measured."""
    if device.startswith("cuda"):
        return {"gbps": machine.measure_device_bandwidth(device),
                "source": f"{device}: device-to-device copy of 1 GiB, bytes read + written, best of 10"}
    return {"gbps": ceilings["copy_gbps"], "source": "the CPU copy ceiling copy_gbps: a 256 MiB copy, read + written"}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark: 0 when it ran (peer failures are reported in the results), 2 on bad arguments."""
    try:
        concurrency = parse_concurrency(args.concurrency)
        names = parse_decode_peers(args.peers)
        user = parse_config(args.kvloom_config)
        if args.prompt_len < 1 or args.output_len < 2 or args.repeats < 1:
            raise ValueError("--prompt-len must be >= 1, --output-len >= 2 (a decode step), --repeats >= 1")
        device = resolve_device(str(user.get("device", args.device)))
    except ValueError as exc:
        return refuse("decode", exc)
    # The dtype is --dtype on --device: what dtype="auto" picks on this CPU is not the question here.
    bench = start("decode", argv, args.model, args.quick, SIZES[args.size], show_auto_dtype=False)
    bandwidth = measure_bandwidth(device, bench.ceilings)
    model_dir = bench.model_dir
    model_config = json.loads((model_dir / "config.json").read_text())
    vocab = read_vocab_size(model_dir)

    def prompts_at(c: int) -> list[list[int]]:
        return Workload(c, args.prompt_len, args.prompt_len, args.output_len, args.seed).prompts(vocab)

    config = {"device": device, "dtype": args.dtype} | kvloom_config(user, prompts_at(max(concurrency)),
                                                                    args.output_len)
    kv = _Kvloom(model_dir, config, args.output_len)
    dtype = kv.llm.dtype_choice.name
    budget = kv.llm.config.scheduler.max_num_batched_tokens
    models = load_hf_models(model_dir, [PeerSpec("any", "static", dtype=dtype)] if names else [], device)
    shape = DecodeShape.from_config(model_config)
    print(f"model: {model_dir} ({shape.weight_params / 1e6:.1f}M weights read a decode step)\nworkload: concurrency "
          f"{','.join(map(str, concurrency))}; prompts of {args.prompt_len} random token ids, {args.output_len} output "
          f"tokens each, greedy, EOS ignored; repeats {args.repeats}; peers {args.peers or 'none'}")

    errors: dict[str, str | None] = {n: models.get(PeerSpec(n, "static", dtype=dtype))[1] for n in names}
    warm = prompts_at(concurrency[0])
    kv.run(warm)
    for n in (n for n in names if errors[n] is None):
        spec_min = peer_spec(n, concurrency[0], dtype, budget)
        if error := attempt(partial(run_transformers, spec_min, models.models[dtype], warm, args.output_len)):
            errors[n] = f"warm-up: {error}"

    results = []
    for c in concurrency:
        specs = {n: peer_spec(n, c, dtype, budget) for n in names}
        systems = measure(kv, specs, models.models.get(dtype), errors, prompts_at(c), args.output_len, args.repeats)
        roof = roofline(shape, dtype, float(bandwidth["gbps"]), concurrency=c, prompt_len=args.prompt_len,
                        output_len=args.output_len)
        decode = systems[0]["decode_tokens_per_s"]
        systems[0]["pct_of_roofline"] = float(f"{100 * decode / roof.tokens_per_s:.3g}") if decode else None
        results.append({"concurrency": c, "roofline": roof.as_dict(), "systems": systems})

    llm_config = kv.llm.config
    kvloom_entry = {
        "device": device, "dtype": dtype, "dtype_reason": kv.llm.dtype_choice.reason,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
        "max_num_batched_tokens": budget, "block_size": llm_config.cache.block_size,
        "startup_s": round(kv.startup_s, 3), "enforce_eager": llm_config.enforce_eager,
        "cuda_graph_sizes": llm_config.cuda_graph_sizes, "captured_graph_sizes": list(kv.llm.core.cuda_graph_sizes),
        "async_scheduling": kv.llm.core.async_scheduling,
    }
    result = bench.envelope("decode", SCHEMA_VERSION)
    result["machine"]["bandwidth"] = bandwidth
    result["model"] |= {"size": args.size if bench.spec else None, "weight_params_per_step": shape.weight_params,
                        "kv_values_per_token": shape.kv_values_per_token}
    result |= {
        "workload": {"concurrency": concurrency, "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "seed": args.seed, "repeats": args.repeats, "peers": names},
        "kvloom": kvloom_entry, "results": results,
    }
    result["summary"] = summarize(result)
    print(format_report(result))
    write_result(args.json, result)
    return 0
