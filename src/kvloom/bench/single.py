"""``python -m kvloom bench single``: a few users at a time on one machine: kvloom's ``generate`` and
``stream``, in float and in int8, transformers, and llama.cpp's server where one runs, on one checkpoint and
one set of prompts, taking turns.

Systems (``--systems``, comma separated; each runs at every ``--streams`` count):

- ``generate``, ``stream``: kvloom in ``--dtype`` (``auto``: float32, or bf16 on CPUs with bf16 units),
  ``LLM.generate`` with every prompt in one call, and ``AsyncEngine.stream`` with one consumer task per
  prompt on one event loop (the loop runs on this thread; the engine steps on its own thread).
- ``generate-int8``, ``stream-int8``: the same with ``quantization="int8"``.
- ``generate-int8-kv``: int8 weights and ``kv_cache_dtype="int8"``.
- ``transformers``, ``transformers-int8``: transformers ``generate`` (one static batch of every prompt, left
  padding; the same dtype as kvloom's float systems), the second with every ``nn.Linear`` holding int8
  weights per output channel and multiplying through ``torch.ops.aten._weight_int8pack_mm``: the kernel
  torchao's ``Int8WeightOnlyConfig`` calls on CPU, without torchao (which, once installed, transformers
  imports into every process that loads a model).
- ``llamacpp-<NAME>``: a running ``llama-server`` (llama.cpp's own server: a bench peer, never a runtime
  dependency, reached over HTTP) at the URL ``--llama-server NAME=URL`` names, serving a GGUF of the same
  checkpoint (convert it with llama.cpp's ``convert_hf_to_gguf.py --outtype f32|f16|q8_0``; start it with
  ``--parallel 16 --cont-batching -t 2``). Each stream is one ``/completion`` request of the prompt's token
  ids (tokenizers do not matter), ``n_predict`` tokens, greedy, EOS ignored, the streams sent at once from
  threads; a stream's first token is its send time plus the server's own ``prompt_ms`` (llama-server holds
  back streamed tokens that end mid-character, so streamed chunks would time it late).

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
KVLOOM_SYSTEMS = ("generate", "stream", "generate-int8", "stream-int8", "generate-int8-kv")
PEERS = ("transformers", "transformers-int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench single``."""
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: the standard ~155M random checkpoint)")
    parser.add_argument("--systems", default="generate,stream,generate-int8,stream-int8",
                        help="comma separated: generate, stream, generate-int8, stream-int8, llamacpp-<NAME>")
    parser.add_argument("--llama-server", action="append", default=[], metavar="NAME=URL",
                        help="a running llama-server for llamacpp-<NAME>, e.g. Q8_0=http://127.0.0.1:8081 (repeatable)")
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


def parse_systems(text: str, servers: dict[str, str]) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--systems: expected distinct names, comma separated; got {text!r}")
    for name in names:
        if name.startswith("llamacpp-"):
            if name.removeprefix("llamacpp-") not in servers:
                raise ValueError(f"--systems: {name} needs --llama-server {name.removeprefix('llamacpp-')}=URL")
        elif name not in KVLOOM_SYSTEMS + PEERS:
            raise ValueError(f"--systems: {name!r} is not one of {', '.join(KVLOOM_SYSTEMS + PEERS)} or "
                             "llamacpp-<NAME>")
    return names


def parse_servers(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--llama-server: expected NAME=http://HOST:PORT, got {item!r}")
        out[name] = url.rstrip("/")
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


def _int8_weight_only(model: Any) -> None:
    """Give every ``nn.Linear`` of a transformers ``model`` int8 weights per output channel (symmetric), multiplied
    by ``aten._weight_int8pack_mm`` (float activations), as torchao's int8 weight-only does on CPU."""
    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            w = linear.weight.detach().float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(linear.weight.dtype)
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale)
            out = out.reshape(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear(child))


class Transformers:
    """transformers ``generate``: one static batch of every prompt (left padding), greedy; ``int8``: every linear
    layer int8 weight-only (``_int8_weight_only``)."""

    def __init__(self, model_dir: Path, dtype: str, int8: bool, output_len: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        auto: Any = AutoModelForCausalLM
        self.model = auto.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
        if int8:
            _int8_weight_only(self.model)
        self.output_len = output_len

    def run(self, prompts: list[list[int]]) -> Pass:
        from kvloom.bench.peers import PeerSpec, run_peer

        done = run_peer(PeerSpec(f"static{len(prompts)}", "static", batch_size=len(prompts)), self.model, prompts,
                        self.output_len)
        first = max(done.ttft_s) if done.ttft_s else done.wall_s
        return Pass(first, done.wall_s, done.token_ids)


class LlamaServer:
    """A running llama-server: each stream one ``/completion`` request of token ids, all sent at once."""

    def __init__(self, url: str, output_len: int) -> None:
        self.url = url
        self.output_len = output_len
        self._post("/health", None)  # fails here, clearly, when nothing listens

    def _post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            reply: dict[str, Any] = json.loads(response.read() or b"{}")
        return reply

    def run(self, prompts: list[list[int]]) -> Pass:
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()

        def one(prompt: list[int]) -> tuple[float, float, list[int]]:
            sent = time.perf_counter() - start
            reply = self._post("/completion", {
                "prompt": prompt, "n_predict": self.output_len, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]})
            end = time.perf_counter() - start
            return sent + float(reply["timings"]["prompt_ms"]) / 1e3, end, [int(t) for t in reply.get("tokens", [])]

        with ThreadPoolExecutor(len(prompts)) as pool:
            done = list(pool.map(one, prompts))
        return Pass(max(d[0] for d in done), max(d[1] for d in done), [d[2] for d in done])


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
        servers = parse_servers(args.llama_server)
        names = parse_systems(args.systems, servers)
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
                systems[name] = LlamaServer(servers[name.removeprefix("llamacpp-")], args.output_len)
            elif name in PEERS:
                dtype = next((s.describe()["dtype"] for s in systems.values() if hasattr(s, "describe")), "float32")
                systems[name] = Transformers(model_dir, dtype, name.endswith("int8"), args.output_len)
            else:
                cls = KvloomStream if name.startswith("stream") else KvloomGenerate
                extra = {"quantization": "int8"} if "int8" in name else {}
                if name.endswith("-kv"):
                    extra["kv_cache_dtype"] = "int8"
                systems[name] = cls(model_dir, kv_config | extra, args.output_len)
            errors[name] = None
        except Exception as exc:
            if not _is_peer(name):
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"
    results = []
    for c in streams:
        runnable = [n for n in names if errors[n] is None]
        for n in runnable:  # an untimed pass each
            systems[n].run(prompts[c])
        contenders = [System(n, _bound(systems[n].run, prompts[c]), fallible=_is_peer(n)) for n in runnable]
        turns = take_turns(contenders, args.rounds, progress=f"  {c} streams, round {{rep}}: {{name}} ...")
        reference = turns.runs[runnable[0]][0].token_ids if runnable and turns.runs[runnable[0]] else None
        entries = []
        for n in names:
            passes = turns.runs.get(n, [])
            error = errors[n] or turns.errors.get(n)
            entry: dict[str, Any] = {"name": n, "error": error, **(_rates(passes, c, args.prompt_len, args.output_len)
                                                                  if passes else {})}
            if passes and reference is not None:
                got = passes[0].token_ids
                same = sum(a == b for ra, rb in zip(reference, got, strict=True) for a, b in zip(ra, rb, strict=False))
                entry["tokens_equal_to_first_system"] = round(same / sum(len(r) for r in reference), 4)
            if passes and not _is_peer(n) and entry.get("decode_tokens_per_s"):
                desc = systems[n].describe()
                bytes_step = weight_bytes(shape, config, desc["dtype"], "int8" in n)
                entry["weight_gbps"] = round(bytes_step * entry["decode_tokens_per_s"] / c / 1e9, 2)
            entries.append(entry)
        results.append({"streams": c, "systems": entries})
    described = {n: systems[n].describe() for n in names if n in systems and not _is_peer(n)}
    for system in systems.values():
        if isinstance(system, KvloomStream):
            system.close()
    result = bench.envelope("single", SCHEMA_VERSION)
    result |= {"workload": {"streams": streams, "prompt_len": args.prompt_len, "output_len": args.output_len,
                            "rounds": args.rounds, "seed": args.seed, "systems": names,
                            "llama_server": servers},
               "kvloom": described, "results": results}
    print(format_report(result, bench.ceilings.get("copy_gbps")))
    write_result(args.json, result)
    return 0


def _is_peer(name: str) -> bool:
    return name.startswith("llamacpp-") or name in PEERS


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
