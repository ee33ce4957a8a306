"""Peers with dtypes (``static32@bf16``, ``cb512@bf16``): parsing, the machine-dependent default
set, and one transformers model per dtype shared by the peers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench import peers, serve, throughput
from kvloom.bench.peers import PeerSpec, default_peers, load_hf_models, parse_peers
from kvloom.models.dtype_choice import CpuMatmulSupport
from tests.fakes import fake_cpu


def test_dtype_suffixes_parse_to_canonical_names() -> None:
    specs = parse_peers("static16, static32@bf16,cb512@fp32,cb2048r32@bf16")
    assert [(s.name, s.kind, s.batch_size, s.max_batch_tokens, s.max_requests_per_batch, s.dtype) for s in specs] == [
        ("static16", "static", 16, 0, None, "float32"),
        ("static32@bf16", "static", 32, 0, None, "bfloat16"),
        ("cb512", "cb", 0, 512, None, "float32"),  # @fp32 is the default: no suffix in the name
        ("cb2048r32@bf16", "cb", 0, 2048, 32, "bfloat16"),
    ]
    assert "bfloat16" in specs[1].describe() and "float32" in specs[0].describe()


@pytest.mark.parametrize(("bad", "says"), [
    ("cb512@fp16", "must be @fp32 or @bf16, not @fp16"),
    ("static8@bfloat16", "must be @fp32 or @bf16, not @bfloat16"),
    ("static8@", "must be @fp32 or @bf16, not @"),
    ("static8@bf16@fp32", "is not static<B> or cb<T>"),
    ("static0@bf16", "positive numbers"),
    ("cb@bf16", "is not static<B> or cb<T>"),
    ("static8,static8@fp32", "static8 is given twice"),
])
def test_bad_dtype_specs_name_the_flag(bad: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"^--peers: ") as info:
        parse_peers(bad)
    assert says in str(info.value)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_default_peers_add_bf16_twins_only_on_a_fast_bf16_cpu(
    fast_bf16: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cpu(monkeypatch, CpuMatmulSupport(amx=False, avx512_bf16=fast_bf16))
    fp32 = ["static8", "static16", "static32", "cb512", "cb1024", "cb2048"]
    bf16 = [f"{n}@bf16" for n in fp32] if fast_bf16 else []
    assert [s.name for s in throughput.resolve_peers(None)] == fp32 + bf16
    assert [s.name for s in serve.resolve_peers(None)] == ["cb512", "cb2048"] + (
        ["cb512@bf16", "cb2048@bf16"] if fast_bf16 else [])
    assert default_peers("cb64") == ("cb64,cb64@bf16" if fast_bf16 else "cb64")
    # --peers wins over the machine, '' meaning none.
    assert [s.name for s in throughput.resolve_peers("cb64@bf16")] == ["cb64@bf16"]
    assert throughput.resolve_peers("") == [] and serve.resolve_peers("") == []


def test_each_dtype_is_loaded_once_and_a_failed_load_is_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []

    def fake_load(model_dir: Path, dtype: str = "float32") -> object:
        loads.append(dtype)
        if dtype == "bfloat16":
            raise OSError("no bf16 here")
        return f"model-{dtype}"

    monkeypatch.setattr(peers, "load_hf_model", fake_load)
    specs = parse_peers("static8,cb512@bf16,cb512,static16@bf16")
    models = load_hf_models(Path("/unused"), specs)
    assert loads == ["float32", "bfloat16"]
    assert models.get(specs[2]) == ("model-float32", None)
    assert models.get(specs[3]) == (None, "OSError: no bf16 here")
    assert models.get(PeerSpec("x", "cb", dtype="float16"))[1] == "no float16 model was loaded"
    assert load_hf_models(Path("/unused"), []).models == {} and loads == ["float32", "bfloat16"]


def test_a_bf16_peer_runs_in_bf16(checkpoint_factory: Callable[..., Path]) -> None:
    import torch

    model_dir = checkpoint_factory(arch="llama", with_tokenizer=False)
    spec = parse_peers("static2@bf16")[0]
    model = load_hf_models(model_dir, [spec]).get(spec)[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    run = peers.run_peer(spec, model, [[1, 2, 3], [4, 5]], output_len=3)
    assert [len(t) for t in run.token_ids] == [3, 3]
