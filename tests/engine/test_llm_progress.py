"""``LLM.generate`` / ``LLM.chat`` progress bar: on when forced or on a terminal, silent otherwise."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from kvloom import LLM, InvalidRequestError, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = ["Hello there", "The cache is", "One two three"]
TOK_S = re.compile(r"output: (\d+\.\d) tok/s")


class FakeTerminal(io.StringIO):
    """A captured stream that says it is a terminal, as an interactive stderr does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(llama_dir)


def test_forced_bar_shows_requests_done_and_output_tokens_per_second(
    llm: LLM, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=True)
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar goes to stderr, never into the program's output
    assert "Processed prompts" in captured.err
    assert "3/3" in captured.err
    figures = [float(f) for f in TOK_S.findall(captured.err)]
    assert figures and figures[-1] > 0, captured.err  # the final figure counts the tokens generated
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]


def test_chat_bar_counts_conversations(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    llm.chat(convs, PARAMS, use_tqdm=True)
    err = capsys.readouterr().err
    assert "2/2" in err and TOK_S.search(err), err


def test_off_writes_nothing_even_on_a_terminal(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm.chat([{"role": "user", "content": "Hi"}], PARAMS, use_tqdm=False)
    assert terminal.getvalue() == ""


def test_auto_is_off_when_stderr_is_not_a_terminal(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    llm.generate(PROMPTS, PARAMS)
    assert capsys.readouterr().err == ""


def test_auto_is_on_when_stderr_is_a_terminal(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    llm.generate(PROMPTS, PARAMS)
    assert "3/3" in terminal.getvalue() and TOK_S.search(terminal.getvalue()), terminal.getvalue()


def broken_factory() -> object:
    raise RuntimeError("no processor today")


def test_bar_is_closed_when_the_batch_fails(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that fails inside the engine ends the call with an error; the bar still ends its line."""
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    broken = SamplingParams(max_tokens=4, logits_processors=[broken_factory])
    with pytest.raises(InvalidRequestError, match="no processor today"):
        llm.generate(PROMPTS, [PARAMS, broken, PARAMS], use_tqdm=True)
    assert "0/3" in terminal.getvalue() and terminal.getvalue().endswith("\n"), terminal.getvalue()
    llm.assert_idle()


JUPYTER = """
import sys, types, warnings
# What tqdm.auto looks at to pick its notebook widget: an ipykernel shell is loaded...
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
ipython = types.ModuleType("IPython")
ipython.get_ipython = type("ZMQInteractiveShell", (), {})
sys.modules["IPython"] = ipython
sys.modules["ipywidgets"] = None  # ...and ipywidgets is not installed: tqdm warns "IProgress not found"
"""


def run_in_jupyter(code: str) -> str:
    """``code`` in a fresh interpreter that looks like a Jupyter kernel without ipywidgets; its stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", JUPYTER + code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_building_an_engine_in_jupyter_prints_no_tqdm_widget_warning(llama_dir: Path) -> None:
    # The kernel as simulated does make transformers' import warn (else this test proves nothing)...
    assert "IProgress not found" in run_in_jupyter("import transformers")
    # ...but building an engine, which imports it to load the tokenizer, does not; no filter of
    # that warning outlives the build, and tqdm.auto is the plain bar it falls back to anyway.
    err = run_in_jupyter(f"""
from kvloom import LLM
LLM({str(llama_dir)!r}).close()
import tqdm.autonotebook, tqdm.std
assert tqdm.autonotebook.tqdm is tqdm.std.tqdm
assert not [f for f in warnings.filters if f[2] is tqdm.std.TqdmWarning or "IProgress" in str(f[1])], warnings.filters
""")
    assert "IProgress" not in err and "TqdmWarning" not in err, err
