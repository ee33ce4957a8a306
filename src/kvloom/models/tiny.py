"""Deterministic tiny HF checkpoints (random weights, locally trained tokenizer).

Tests, the demo and benchmarks build real checkpoint directories from a config, so the
real loading path (config.json + safetensors, sharded or not, tokenizer files) is what gets
exercised, and transformers can load the same directory as the reference.

Nothing here touches the network; the tokenizer is trained with ``tokenizers`` on a small
built-in corpus, so two calls with the same arguments give identical files.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from kvloom.models.chat_templates import CHAT_TEMPLATES, CHATML, ChatTemplateName

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

Arch = Literal["llama", "mistral", "qwen2", "qwen3"]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = CHATML
"""The default template (ChatML; ``chat_template="hermes"`` / ``"llama3"`` add tool support)."""

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village by the sea, and every morning the fishermen went out
to sail while the children played on the sand. The weather was warm and the sky was blue.
You are a helpful assistant. Answer the question briefly and politely. What is the capital of France?
The capital of France is Paris. How many days are in a week? There are seven days in a week.
Please write a short story about a robot who learns to paint. The robot looked at the colors and smiled.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 2024. Dates like 2024-05-01 and times like 12:30.
def hello(name):\n    return f"Hello, {name}!"\nprint(hello("world"))
{"name": "Alice", "age": 30, "city": "London", "tags": ["a", "b"], "active": true, "score": null}
SELECT id, name FROM users WHERE age > 21 ORDER BY name;
Good morning! How are you today? I am fine, thank you. Let me know if you need anything else.
The engine schedules requests, runs the model, samples tokens and streams the text back.
"""


def _corpus_lines(synthetic_words: int = 0) -> list[str]:
    """The built-in corpus plus deterministic recombinations, so merges beyond the raw text exist,
    plus ``synthetic_words`` pseudo-words (seeded) for tokenizers with a realistic vocabulary size."""
    import random

    lines = [line for line in _CORPUS.splitlines() if line]
    words = _CORPUS.split()
    # A fixed stride walk over the words: deterministic, no RNG, varied bigrams.
    extra = [" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(12)) for i in range(200)]
    rng = random.Random(0)
    # Zipf-like reuse (a word list sampled with skewed weights) makes frequent multi-letter merges.
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    lexicon = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(2, 9)))
               for _ in range(max(1, synthetic_words // 8))]
    synthetic = [" ".join(rng.choices(lexicon, k=16)) for _ in range(synthetic_words // 16)]
    return lines * 4 + extra + synthetic


def train_tokenizer(
    vocab_size: int, synthetic_words: int = 0, chat_template: ChatTemplateName = "chatml",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic).

    ``synthetic_words`` adds that many seeded pseudo-words to the corpus: the built-in text
    alone yields only ~700 tokens, so a tokenizer near a real one's size (e.g. 32,000) needs them.

    The result holds ``len(tokenizer) <= vocab_size`` tokens: 256 byte tokens, the special
    tokens ``<|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>`` (ids 0..4) and merges. Any
    UTF-8 text round-trips through encode/decode. ``tokenizer.chat_template`` is
    ``CHAT_TEMPLATES[chat_template]``: ChatML (roles system/user/assistant,
    ``add_generation_prompt`` opens an assistant turn), or a tool-capable one (see
    ``kvloom.models.chat_templates``).
    Encoding adds no BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer_cls: Any = PreTrainedTokenizerFast  # untyped constructor

    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} for a byte-level tokenizer, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(synthetic_words), trainer=trainer)
    hf_tok: PreTrainedTokenizerFast = tokenizer_cls(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATES[chat_template]
    if len(hf_tok) > vocab_size:  # guards the invariant callers rely on (model vocab >= tokenizer)
        raise AssertionError(f"trained tokenizer has {len(hf_tok)} tokens > vocab_size {vocab_size}")
    return hf_tok


def _hf_config(arch: Arch, common: dict[str, Any]) -> Any:  # a PretrainedConfig (untyped API)
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        # sliding_window=None: full attention (kvloom refuses real sliding windows).
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False)
    raise ValueError(f"arch must be one of llama, mistral, qwen2, qwen3; got {arch!r}")


@torch.no_grad()
def _reinit(
    model: torch.nn.Module, *, seed: int, hidden_size: int, tied: bool, init_std: float | None
) -> None:
    """Re-initialise every parameter from a private generator, in sorted-name order."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        shape = param.shape
        if init_std is not None:
            # Plain HF-style init: normal matrices, zero biases, unit norms.
            if param.ndim == 2:
                value = torch.randn(shape, generator=gen) * init_std
            else:
                value = torch.ones(shape) if "norm" in name else torch.zeros(shape)
        elif "embed_tokens" in name:
            std = 2.0 / math.sqrt(hidden_size) if tied else 1.0
            value = torch.randn(shape, generator=gen) * std
        elif "lm_head" in name:
            value = torch.randn(shape, generator=gen) * (2.0 / math.sqrt(hidden_size))
        elif param.ndim == 2:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        elif "norm" in name:
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:  # biases
            value = 0.1 * torch.randn(shape, generator=gen)
        param.copy_(value)


def build_checkpoint(
    out_dir: str | Path,
    *,
    arch: Arch = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    init_std: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    tokenizer_words: int = 0,
    chat_template: ChatTemplateName = "chatml",
) -> Path:
    """Write a random-weight HF checkpoint directory for ``arch`` and return its path.

    Files: ``config.json``, ``model.safetensors`` (or shards + ``model.safetensors.index.json``
    when ``max_shard_size`` is small enough), ``generation_config.json`` (EOS ids
    ``[<|eos|>, <|im_end|>]``) and, with ``with_tokenizer``, the tokenizer files (trained with
    ``tokenizer_words`` extra pseudo-words and ``chat_template``: see ``train_tokenizer``). Qwen2 has qkv
    biases; Qwen3 has q/k RMSNorm and an explicit ``head_dim``. ``rope_scaling`` is the legacy
    dict (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``); transformers may rewrite it
    into ``rope_parameters`` when saving.

    Init (``init_std=None``, the default): HF's default (std 0.02 everywhere) gives a tiny
    model nearly flat logits, so greedy argmax flips on 1e-6 float noise. Instead, from a
    private ``torch.Generator`` seeded with ``seed``, in sorted parameter-name order:
    embeddings ~ N(0, 1) (N(0, 2/sqrt(hidden)) when tied), lm_head ~ N(0, 2/sqrt(hidden)),
    every other matrix ~ N(0, 1/sqrt(fan_in)), norm weights ~ 1 + N(0, 0.1), biases ~
    N(0, 0.1). Sub-layer outputs are O(1), attention is far from uniform, logits have std ~2,
    so top-1/top-2 gaps are typically ~0.1-1 while activations stay O(1). Random norm weights
    and biases also catch weight-mapping mistakes that ones/zeros would hide. With
    ``init_std`` set: every matrix ~ N(0, init_std), norms ones, biases zeros. The caller's
    global RNG state is left untouched.
    """
    import transformers

    auto_model: Any = transformers.AutoModelForCausalLM  # untyped API
    generation_config_cls: Any = transformers.GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size, tokenizer_words, chat_template) if with_tokenizer else None
    bos_id, eos_id, pad_id = 0, 1, 2
    eos_ids = [eos_id, 4]  # <|eos|>, <|im_end|>: ids are fixed by SPECIAL_TOKENS' order
    if tokenizer is not None and tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) != [0, 1, 2, 3, 4]:
        raise AssertionError("special tokens must hold ids 0..4 (the config's bos/eos/pad ids assume it)")
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rope_scaling=dict(rope_scaling) if rope_scaling is not None else None,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        head_dim=head_dim or hidden_size // num_heads,
        tie_word_embeddings=tie_word_embeddings,
    )
    config = _hf_config(arch, common)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    with torch.random.fork_rng(devices=[]):  # seed HF's own init without touching the caller's RNG
        torch.manual_seed(seed)
        model = auto_model.from_config(config).float()
    _reinit(model, seed=seed, hidden_size=hidden_size, tied=tie_word_embeddings, init_std=init_std)
    model = model.to(dtype)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4.x; always safetensors in 5.x
    model.save_pretrained(out, **save_kwargs)
    generation_config_cls(bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
