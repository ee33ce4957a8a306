"""The tiny-checkpoint builder: deterministic, loadable by transformers, with a usable tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvloom.models.config import load_model_config
from kvloom.models.tiny import EOS_TOKEN, IM_END, build_checkpoint, train_tokenizer


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    a = build_checkpoint(tmp_path / "a", arch="qwen3", seed=3)
    b = build_checkpoint(tmp_path / "b", arch="qwen3", seed=3)
    c = build_checkpoint(tmp_path / "c", arch="qwen3", seed=4, with_tokenizer=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not (c / "tokenizer.json").exists()


def test_tokenizer_round_trips_and_fits_vocab() -> None:
    tok = train_tokenizer(300)
    assert len(tok) <= 300
    text = 'Hello, world! ünïcode 日本 {"a": 1}\n'
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < 300
    assert tok.eos_token == EOS_TOKEN and tok.pad_token_id is not None and tok.bos_token_id is not None
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(100)


def test_chat_template_and_eos_ids(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert isinstance(no_gen, str) and not no_gen.endswith("assistant\n")
    eos_ids = load_model_config(checkpoints["llama"]).eos_token_ids
    assert list(eos_ids) == tok.convert_tokens_to_ids([EOS_TOKEN, IM_END])


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    path = build_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, with_tokenizer=False)
    assert load_model_config(path).torch_dtype == torch.bfloat16
