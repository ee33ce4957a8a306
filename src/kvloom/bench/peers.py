"""transformers peers, driven the way BENCHMARKS.md found fastest on CPU.

Two families, named on the command line:

- ``static<B>``: ``model.generate`` on consecutive batches of ``B`` prompts, left-padded with an
  attention mask. EOS is disabled by passing ``eos_token_id=None`` *and* ``pad_token_id`` as
  ``generate()`` keywords (a ``GenerationConfig(eos_token_id=None)`` would be merged back with
  the model's default and stop early).
- ``cb<T>[r<R>]``: continuous batching, ``model.generate_batch`` with a ``ContinuousBatchingConfig``
  of ``max_batch_tokens=T`` (and ``max_requests_per_batch=R``), ``num_blocks`` set explicitly
  (its CPU default takes 60% of host RAM) and ``eos_token_id=-1``. Not run under
  ``torch.inference_mode()``: its background thread fails there.

``serve_cb`` drives a ``cb`` peer online for ``bench serve``: its ``ContinuousBatchingManager``
directly, requests added at their arrival times, per-token timestamps recorded.

Models load on the CPU; ``load_hf_models(..., device=)`` moves them (``bench decode`` on a GPU),
and the static peer builds its inputs on the model's device.

Either family takes a dtype suffix: ``static32@bf16``, ``cb512@bf16`` (``@fp32``, or no suffix,
is float32). Each dtype the peers need is loaded once (``load_hf_models``) and shared by them.
The default set depends on the machine (``default_peers``): the bf16 twins are added only where
the CPU multiplies bf16 in hardware (``kvloom.models.dtype_choice``), since elsewhere bf16 is
emulated and hundreds of times slower than float32.

Every peer returns the generated token ids per request, so the benchmark can check that
greedy kvloom produces the same tokens as a peer *of the same dtype* (in float32 every
transformers variant agrees; in bf16, near-ties may break differently).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

PAGE_SIZE = 256
"""Tokens per continuous-batching page (transformers' default)."""
PEER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""``--peers`` suffix -> the dtype's name (as torch and kvloom's ``DTypeChoice.name`` spell it)."""
DTYPE_TAGS = {name: tag for tag, name in PEER_DTYPES.items()}
"""A dtype's name -> its short tag (``"bfloat16"`` -> ``"bf16"``)."""


@dataclass(slots=True)
class PeerRun:
    """One pass of a peer over the whole workload."""

    wall_s: float
    token_ids: list[list[int]]
    """Generated tokens per request, in prompt order (prompt excluded)."""
    ttft_s: list[float] | None
    """Seconds from the start of the pass to each request's first token, when known."""


@dataclass(slots=True)
class RequestTrace:
    """One request's timeline in one served pass (``time.perf_counter`` seconds; ``bench serve``)."""

    arrival: float
    """Scheduled arrival (the pass's clock start + the request's offset)."""
    submitted: float
    """When the system was actually handed the request."""
    first_token: float
    end: float
    token_ids: list[int] = field(default_factory=list)
    num_chunks: int = 0
    """Stream chunks carrying tokens (kvloom) or per-token timestamps (transformers)."""


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """A parsed ``--peers`` entry."""

    name: str
    """Canonical: ``static16``, ``cb2048r32``, ``cb512@bf16`` (float32 carries no suffix)."""
    kind: str
    """``"static"`` or ``"cb"``."""
    batch_size: int = 0
    max_batch_tokens: int = 0
    max_requests_per_batch: int | None = None
    dtype: str = "float32"
    """A value of ``PEER_DTYPES``: what the transformers model's weights and KV are held in."""

    def describe(self) -> str:
        where = f", {self.dtype}"
        if self.kind == "static":
            return f"transformers generate, static batches of {self.batch_size}, left padding{where}"
        extra = f", max_requests_per_batch={self.max_requests_per_batch}" if self.max_requests_per_batch else ""
        return f"transformers continuous batching, max_batch_tokens={self.max_batch_tokens}{extra}{where}"


_SPEC = re.compile(r"^(?:static(?P<b>\d+)|cb(?P<t>\d+)(?:r(?P<r>\d+))?)(?:@(?P<dtype>[^@]*))?$")


def parse_peers(text: str) -> list[PeerSpec]:
    """``"static8,static16@bf16,cb512,cb2048r32"`` -> specs; an empty string means no peers.

    Names come back canonical (``static8@fp32`` is ``static8``); a peer named twice is an error,
    as is a dtype other than ``@fp32`` / ``@bf16``. Every error message names ``--peers``."""
    specs: list[PeerSpec] = []
    for raw in filter(None, (part.strip() for part in text.split(","))):
        match = _SPEC.match(raw)
        numbers = (match[k] for k in ("b", "t", "r")) if match else ()
        if match is None or any(int(v) < 1 for v in numbers if v is not None):
            raise ValueError(f"--peers: {raw!r} is not static<B> or cb<T>[r<R>] with positive numbers, "
                             "optionally @fp32 or @bf16")
        tag = match["dtype"]
        if tag is not None and tag not in PEER_DTYPES:
            raise ValueError(f"--peers: {raw!r}: the dtype suffix must be @fp32 or @bf16, not @{tag}")
        dtype = PEER_DTYPES[tag or "fp32"]
        base = raw.partition("@")[0]
        name = base if dtype == "float32" else f"{base}@{DTYPE_TAGS[dtype]}"
        if any(s.name == name for s in specs):
            raise ValueError(f"--peers: {name} is given twice")
        if match["b"]:
            specs.append(PeerSpec(name, "static", batch_size=int(match["b"]), dtype=dtype))
        else:
            r = int(match["r"]) if match["r"] else None
            specs.append(PeerSpec(name, "cb", max_batch_tokens=int(match["t"]), max_requests_per_batch=r,
                                  dtype=dtype))
    return specs


def default_peers(float32_peers: str, fast_bf16: bool | None = None) -> str:
    """``float32_peers`` (e.g. ``"static8,cb512"``), plus each one ``@bf16`` where the CPU has fast
    bf16 (``fast_bf16``; default: ``CpuMatmulSupport.probe()``, as ``dtype="auto"`` decides)."""
    if fast_bf16 is None:
        from kvloom.models.dtype_choice import CpuMatmulSupport

        fast_bf16 = CpuMatmulSupport.probe().fast_bf16
    names = [n.strip() for n in float32_peers.split(",") if n.strip()]
    return ",".join(names + ([f"{n}@bf16" for n in names] if fast_bf16 else []))


def load_hf_model(model_dir: Path, dtype: str = "float32") -> Any:
    """The checkpoint as a transformers model in ``dtype`` (a ``PEER_DTYPES`` value), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return model.eval()


@dataclass(slots=True)
class HfModels:
    """The transformers models the peers need, one per dtype, loaded once and shared."""

    models: dict[str, Any] = field(default_factory=dict)
    """dtype -> model."""
    errors: dict[str, str] = field(default_factory=dict)
    """dtype -> why it failed to load (a failed load is a result, not a crash)."""

    def get(self, spec: PeerSpec) -> tuple[Any, str | None]:
        """``(model, None)`` for ``spec``'s dtype, or ``(None, error)``."""
        if spec.dtype in self.models:
            return self.models[spec.dtype], None
        return None, self.errors.get(spec.dtype, f"no {spec.dtype} model was loaded")


def load_hf_models(model_dir: Path, specs: list[PeerSpec], device: str | None = None) -> HfModels:
    """Each dtype ``specs`` use, loaded once (in the order first named) and moved to ``device``
    (default: where transformers loads it, the CPU); nothing when no specs."""
    loaded = HfModels()
    for dtype in dict.fromkeys(s.dtype for s in specs):
        try:
            model = load_hf_model(model_dir, dtype)
            loaded.models[dtype] = model if device is None else model.to(device)
        except Exception as exc:  # a peer failing to load is a result, not a crash
            loaded.errors[dtype] = f"{type(exc).__name__}: {exc}"
    return loaded


def pad_token_id(model: Any) -> int:
    """The checkpoint's pad id, else its first EOS id, else 0 (only masked positions use it)."""
    for source in (model.generation_config, model.config):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, list) and eos:
        return int(eos[0])
    return eos if isinstance(eos, int) else 0


def run_peer(spec: PeerSpec, model: Any, prompts: list[list[int]], output_len: int) -> PeerRun:
    """One pass of ``spec`` over ``prompts``."""
    if spec.kind == "static":
        return _run_static(model, prompts, output_len, spec.batch_size)
    return _run_cb(model, prompts, output_len, spec)


def warm_up(spec: PeerSpec, model: Any, prompts: list[list[int]]) -> None:
    """A short untimed pass for static peers (first-call costs; cb warms itself up)."""
    if spec.kind == "static":
        _run_static(model, [p[:8] for p in prompts[: spec.batch_size]], 2, spec.batch_size)


def _run_static(model: Any, prompts: list[list[int]], output_len: int, batch_size: int) -> PeerRun:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstTokenClock(StoppingCriteria):  # type: ignore[misc,unused-ignore]
        """Records when the first token of a batch exists; never stops anything."""

        def __init__(self) -> None:
            self.first: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if self.first is None:
                if input_ids.is_cuda:  # kernels run asynchronously: wait for the first token to exist
                    torch.cuda.synchronize(input_ids.device)
                self.first = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    pad = pad_token_id(model)
    tokens: list[list[int]] = []
    ttft: list[float] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
            clock = FirstTokenClock()
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=output_len, do_sample=False,
                eos_token_id=None, pad_token_id=pad, stopping_criteria=StoppingCriteriaList([clock]),
                temperature=None, top_p=None, top_k=None,
            )
            tokens.extend(row[width:].tolist() for row in out)
            ttft.extend([(clock.first or time.perf_counter()) - start] * len(batch))
    return PeerRun(time.perf_counter() - start, tokens, ttft)


def cb_num_blocks(prompts: list[list[int]], output_len: int, page_size: int = PAGE_SIZE) -> int:
    """Blocks for every request at full length at once, plus one spare each: no eviction."""
    return sum(math.ceil((len(p) + output_len) / page_size) + 1 for p in prompts)


def cb_configs(spec: PeerSpec, model: Any, prompts: list[list[int]], output_len: int) -> tuple[Any, Any]:
    """``(GenerationConfig, ContinuousBatchingConfig)`` of a ``cb`` peer: greedy, EOS off, exactly
    ``output_len`` new tokens, ``num_blocks`` sized by ``cb_num_blocks`` and the spec's batch limits."""
    import transformers
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen_config = cast(Any, transformers).GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=pad_token_id(model),
    )
    cb_config = ContinuousBatchingConfig(
        page_size=PAGE_SIZE,
        num_blocks=cb_num_blocks(prompts, output_len),
        max_batch_tokens=spec.max_batch_tokens,
        max_requests_per_batch=spec.max_requests_per_batch,
    )
    return gen_config, cb_config


def _run_cb(model: Any, prompts: list[list[int]], output_len: int, spec: PeerSpec) -> PeerRun:
    gen_config, cb_config = cb_configs(spec, model, prompts, output_len)
    start = time.perf_counter()
    results = model.generate_batch(
        inputs=prompts, generation_config=gen_config, continuous_batching_config=cb_config,
        record_timestamps=True, progress_bar=False,
    )
    wall = time.perf_counter() - start
    outputs = list(results.values())
    if len(outputs) != len(prompts):
        raise RuntimeError(f"generate_batch returned {len(outputs)} results for {len(prompts)} requests")
    errors = [o.error for o in outputs if getattr(o, "error", None)]
    if errors:
        raise RuntimeError(f"generate_batch: {len(errors)} requests failed, first: {errors[0]}")
    # Results come back in input order; check it through the prompts rather than trusting ids.
    for out, prompt in zip(outputs, prompts, strict=True):
        if list(out.prompt_ids) != prompt:
            raise RuntimeError("generate_batch results are not in prompt order")
    ttft = [o.timestamps[0] - start for o in outputs if o.timestamps]
    return PeerRun(wall, [list(o.generated_tokens) for o in outputs], ttft if len(ttft) == len(outputs) else None)


def serve_cb(spec: PeerSpec, model: Any, prompts: list[list[int]], offsets: list[float], output_len: int,
             lead_s: float) -> list[RequestTrace]:
    """Serve ``prompts`` through a ``cb`` peer's ``ContinuousBatchingManager``, request ``i`` handed
    to ``add_request`` ``lead_s + offsets[i]`` seconds after the clock starts (from a driver thread),
    after one untimed warm-up request. First-token and end times are transformers' own per-token
    timestamps (``record_timestamps=True``, taken in its generation thread) and finish time."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen_config, cb_config = cb_configs(spec, model, prompts, output_len)
    # The hints generate_batch would pass, so the config resolves as in ``bench throughput``.
    hints = WorkloadHints(max(map(len, prompts)), output_len, len(prompts))
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config,
                                             workload_hints=hints)
    driver_error: list[BaseException] = []
    submitted = [math.nan] * len(prompts)
    start = math.nan

    def submit(request_id: str, prompt: list[int], max_new_tokens: int) -> None:
        if manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new_tokens,
                               record_timestamps=True, eos_token_id=-1) is None:
            raise RuntimeError(f"add_request refused {request_id}")

    def drive() -> None:
        try:
            for i, prompt in enumerate(prompts):
                time.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
                submitted[i] = time.perf_counter()
                submit(f"serve-{i}", prompt, output_len)
        except BaseException as exc:  # surfaced by wait_all, in the caller's thread
            driver_error.append(exc)

    def wait_all(expected: set[str]) -> dict[str, Any]:
        done: dict[str, Any] = {}
        while len(done) < len(expected):
            if driver_error:
                raise driver_error[0]
            out = manager.get_result(timeout=0.2)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching thread stopped before every request finished")
            elif out.is_finished() and out.request_id in expected:
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                done[out.request_id] = out
        return done

    manager.warmup()
    manager.start()
    try:
        submit("warmup", prompts[0][:8], 2)
        wait_all({"warmup"})
        start = time.perf_counter() + lead_s
        driver = threading.Thread(target=drive, name=f"bench-serve-{spec.name}", daemon=True)
        driver.start()
        outputs = wait_all({f"serve-{i}" for i in range(len(prompts))})
        driver.join()
    finally:
        manager.stop(block=True, timeout=5)
        manager.destroy()
    traces = []
    for i, prompt in enumerate(prompts):
        out = outputs[f"serve-{i}"]
        if list(out.prompt_ids) != prompt or not out.timestamps:
            raise RuntimeError(f"serve-{i}: wrong prompt or no token timestamps in the result")
        end = out.lifespan[1] if out.lifespan[1] > 0 else out.timestamps[-1]
        traces.append(RequestTrace(start + offsets[i], submitted[i], out.timestamps[0], end,
                                   list(out.generated_tokens), len(out.timestamps)))
    return traces
