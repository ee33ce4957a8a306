"""The LangChain and LlamaIndex adapters are built with the same words: ``model_path=`` names
the checkpoint, and an argument neither knows (a typo) is refused naming it, never ignored.
Construction reads at most ``config.json``: nothing here loads weights or starts an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kvloom import AsyncEngine
from kvloom.integrations.langchain import ChatKVLoom, KVLoom
from kvloom.integrations.llama_index import KVLoomLLM

ADAPTERS: dict[str, Any] = {"ChatKVLoom": ChatKVLoom, "KVLoom": KVLoom, "KVLoomLLM": KVLoomLLM}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_model_path_names_the_checkpoint_in_every_adapter(name: str, demo_dir: Path) -> None:
    model = ADAPTERS[name](model_path=demo_dir, max_tokens=8)
    assert Path(model.model_path) == demo_dir and model.model_dir == demo_dir and model.max_tokens == 8


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_misspelt_argument_is_refused_naming_it(name: str, demo_dir: Path) -> None:
    with pytest.raises(ValidationError, match=r"max_token\n.*Extra inputs are not permitted"):
        ADAPTERS[name](model_path=demo_dir, max_token=8)


def test_llama_index_still_takes_the_directory_positionally(demo_dir: Path) -> None:
    assert KVLoomLLM(demo_dir).model_path == KVLoomLLM(model_path=demo_dir).model_path == str(demo_dir)
    with pytest.raises(ValueError, match=r"model_path= .*or engine=.*not both"):
        KVLoomLLM(model_path=demo_dir, engine=AsyncEngine.from_pretrained(demo_dir))
