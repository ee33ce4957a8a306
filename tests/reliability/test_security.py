"""Security: prefix-cache isolation by cache_salt and by adapter under eviction pressure; weights
load only from safetensors + JSON (never pickle); no remote code; no network access."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvloom import LLM, AsyncEngine, SamplingParams
from kvloom.errors import AdapterError, CheckpointError, KvloomError
from kvloom.lora.synthetic import write_random_adapter
from kvloom.models.config import load_model_config

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT_BLOCKS = 3
FULL_HIT = PROMPT_BLOCKS * 16  # a 50-token prompt: 3 whole blocks of 16 can come from the cache


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(n)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- prefix-cache isolation ----------------------------------------------------------------------
@pytest.mark.anyio
async def test_salts_never_share_kv_under_eviction_pressure(llama_dir: Path) -> None:
    prompt = _tokens(50, 1)
    # 10 blocks: each request holds 4, so the filler below evicts cached blocks all the time.
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=10) as engine:
        reference = (await engine.generate(prompt, GREEDY, cache_salt="ref")).token_ids
        hits_by_salt: dict[str, int] = {}
        filler_seed = 100
        for round_ in range(6):
            # Two fresh salts per round, interleaved with a salt seen in every round.
            for salt in (f"a{round_}", "shared", f"b{round_}"):
                out = await engine.generate(prompt, GREEDY, cache_salt=salt)
                assert out.token_ids == reference, "a salt changes caching, never the tokens"
                if salt not in hits_by_salt:
                    assert out.usage.cached_tokens == 0, (
                        f"round {round_}: first request under salt {salt!r} reused KV computed under another salt")
                hits_by_salt[salt] = out.usage.cached_tokens
                again = await engine.generate(prompt, GREEDY, cache_salt=salt)
                assert again.usage.cached_tokens == FULL_HIT, "same-salt repeats hit"
            # Filler: distinct prompts that push everything above out of the pool.
            for _ in range(3):
                await engine.generate(_tokens(60, filler_seed), GREEDY)
                filler_seed += 1
            unsalted = await engine.generate(prompt, GREEDY)
            if round_ == 0:  # never computed unsalted before: nothing salted may be found
                assert unsalted.usage.cached_tokens == 0, "an unsalted request reused salted KV"
            assert unsalted.token_ids == reference
        stats = engine.prefix_cache_stats()
        assert stats is not None and stats.evictions > 0, "the test must run under eviction pressure"
        assert stats.hit_tokens > 0
        engine.assert_idle()


@pytest.mark.anyio
async def test_adapters_and_the_base_model_never_share_kv(llama_dir: Path, tmp_path: Path) -> None:
    config = load_model_config(llama_dir)
    a = write_random_adapter(tmp_path / "a", config, r=4, seed=1)
    b = write_random_adapter(tmp_path / "b", config, r=4, seed=2)
    prompt = _tokens(50, 2)
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=12, max_loras=2, max_lora_rank=8) as engine:
        await engine.load_adapter("a", a)
        await engine.load_adapter("b", b)
        seen: set[tuple[str | None, str | None]] = set()
        outputs: dict[str | None, list[int]] = {}
        filler_seed = 200
        for round_ in range(3):
            for adapter, salt in [("a", None), (None, None), ("b", None), ("a", f"s{round_}"), (None, f"s{round_}"),
                                  ("b", f"s{round_}")]:
                out = await engine.generate(prompt, GREEDY, adapter=adapter, cache_salt=salt)
                key = (adapter, salt)
                if key not in seen:
                    assert out.usage.cached_tokens == 0, f"round {round_}: {key} reused KV of another adapter/salt"
                    seen.add(key)
                else:
                    assert out.usage.cached_tokens in (0, FULL_HIT)
                outputs.setdefault(adapter, out.token_ids)
                assert out.token_ids == outputs[adapter]
                again = await engine.generate(prompt, GREEDY, adapter=adapter, cache_salt=salt)
                assert again.usage.cached_tokens == FULL_HIT and again.token_ids == out.token_ids
            for _ in range(3):  # evict everything above
                await engine.generate(_tokens(70, filler_seed), GREEDY, adapter=("a", None, "b")[filler_seed % 3])
                filler_seed += 1
        assert len({tuple(v) for v in outputs.values()}) == 3, "the adapters really change the model"
        stats = engine.prefix_cache_stats()
        assert stats is not None and stats.evictions > 0
        engine.assert_idle()


# ---- no pickle ----------------------------------------------------------------------------------
@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append((args, kwargs))
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    yield calls
    assert not calls


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_a_pickled_checkpoint_is_refused(llama_dir: Path, tmp_path: Path, name: str, no_torch_load: object) -> None:
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_dir, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / name)  # the real torch.save: only torch.load is forbidden
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        LLM(ckpt)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_a_pickled_adapter_is_refused(llama_dir: Path, tmp_path: Path, name: str, no_torch_load: object) -> None:
    from safetensors.torch import load_file

    adapter = write_random_adapter(tmp_path / "a", load_model_config(llama_dir), r=4)
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / name)
    (adapter / "adapter_model.safetensors").unlink()
    llm = LLM(llama_dir, max_loras=1, max_lora_rank=8)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors"):
        llm.load_adapter("x", adapter)
    llm.core.assert_idle()


def _python_files() -> list[Path]:
    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py"))
    assert len(files) > 50
    return files


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """``file:line what`` for every ``torch.load`` without ``weights_only=True`` and every pickle
    load (``pickle.load(s)``, ``Unpickler``, also through ``from ... import`` aliases)."""
    tree = ast.parse(source, filename)
    torch_names, pickle_names, direct = {"torch"}, {"pickle", "cPickle", "dill", "cloudpickle"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
                if alias.name in ("pickle", "_pickle", "dill", "cloudpickle"):
                    pickle_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module in ("torch", "torch.serialization") and alias.name == "load":
                    direct[alias.asname or "load"] = "torch.load"
                if node.module in ("pickle", "_pickle", "dill", "cloudpickle") and alias.name in (
                        "load", "loads", "Unpickler"):
                    direct[alias.asname or alias.name] = f"pickle.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, what = node.func, None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id in torch_names and func.attr == "load":
                what = "torch.load"
            elif func.value.id in pickle_names and func.attr in ("load", "loads", "Unpickler"):
                what = f"pickle.{func.attr}"
        elif isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch.serialization":
            what = "torch.load"
        elif isinstance(func, ast.Name) and func.id in direct:
            what = direct[func.id]
        if what is None:
            continue
        if what == "torch.load" and any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in node.keywords):
            continue
        found.append(f"{filename}:{node.lineno} {what}")
    return found


def test_the_unsafe_load_scanner_finds_what_it_should() -> None:
    bad = textwrap.dedent("""
        import torch, pickle as pk
        from torch import load as tl
        from pickle import loads
        torch.load("x")
        torch.load("x", weights_only=False)
        tl("x")
        pk.load(open("x", "rb"))
        loads(b"")
        torch.serialization.load("x")
        torch.load("x", weights_only=True)
    """)
    assert [f.split(" ", 1)[1] for f in unsafe_loads(bad)] == [
        "torch.load", "torch.load", "torch.load", "pickle.load", "pickle.loads", "torch.load"]


def test_no_code_path_unpickles() -> None:
    found = [hit for path in _python_files()
             for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, f"unsafe deserialisation: {found}"


# ---- no remote code ----------------------------------------------------------------------------
def test_trust_remote_code_is_never_set() -> None:
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
    assert not found, f"trust_remote_code passed (not a literal False): {found}"


def test_a_checkpoint_asking_for_remote_code_does_not_run_it(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "remote"
    shutil.copytree(llama_dir, ckpt)
    marker = tmp_path / "remote-code-ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for module in ("evil_config", "evil_model", "evil_tokenizer"):
        (ckpt / f"{module}.py").write_text(payload)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig",
                          "AutoModelForCausalLM": "evil_model.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    tok_config_path = ckpt / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    tok_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    tok_config_path.write_text(json.dumps(tok_config))
    try:
        llm = LLM(ckpt)
    except KvloomError as e:  # refusing is fine too, with kvloom's own error
        assert str(ckpt) in str(e)
    else:
        assert len(llm.generate(["hello world"], GREEDY, use_tqdm=False)[0].token_ids) == 8
        llm.close()
    assert not marker.exists(), "code shipped with the checkpoint was executed"


# ---- no network ----------------------------------------------------------------------------------
_GUARD = """
import socket, sys
attempts = []
def _refuse(kind):
    def refuse(*args, **kwargs):
        attempts.append((kind, repr(args)[:200]))
        raise OSError(f"network disabled in this test: {kind}")
    return refuse
_connect = socket.socket.connect
def connect(self, address, *a, **k):
    if self.family == socket.AF_UNIX:
        return _connect(self, address, *a, **k)
    return _refuse("connect")(address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: _refuse("connect_ex")(address)
socket.create_connection = _refuse("create_connection")
socket.getaddrinfo = _refuse("getaddrinfo")
socket.gethostbyname = _refuse("gethostbyname")
"""

_LOAD_AND_GENERATE = """
from kvloom import LLM, SamplingParams
llm = LLM(sys.argv[1], max_loras=1, max_lora_rank=8)
llm.load_adapter("a", sys.argv[2])
params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
base = llm.generate(["hello world"], params, use_tqdm=False)[0]
tuned = llm.generate(["hello world"], params, adapter="a", use_tqdm=False)[0]
assert len(base.token_ids) == len(tuned.token_ids) == 4
llm.close()
print("ATTEMPTS", len(attempts), attempts)
"""


def test_loading_and_generating_never_touch_the_network(llama_dir: Path, tmp_path: Path) -> None:
    adapter = write_random_adapter(tmp_path / "a", load_model_config(llama_dir), r=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "*"}
    proc = subprocess.run([sys.executable, "-c", _GUARD + _LOAD_AND_GENERATE, str(llama_dir), str(adapter)],
                          capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ATTEMPTS 0 []" in proc.stdout, proc.stdout[-2000:]
    assert not (tmp_path / "hf-home").exists() or not any((tmp_path / "hf-home").rglob("*.json")), \
        "nothing was downloaded into the HF cache"


def test_the_network_guard_counts_attempts(tmp_path: Path) -> None:
    code = _GUARD + textwrap.dedent("""
        try:
            socket.create_connection(("example.com", 80), timeout=1)
        except OSError:
            pass
        print("ATTEMPTS", len(attempts))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ATTEMPTS 1" in proc.stdout, proc.stderr
