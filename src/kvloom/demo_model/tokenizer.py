"""The demo model's tokenizer: byte-level BPE trained on the corpus's training split.

Ids 0..4 are ``<|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>`` as in every kvloom test checkpoint
(``kvloom.models.tiny``); the Hermes markers (``<tool_call>``, ``</tool_call>``, ``<tool_response>``,
``</tool_response>``, ``<tools>``, ``</tools>``) are single added tokens that decode to their text, as
in Qwen2.5. Digits are split one per token, so a number of any length is copied digit by digit and a
held-out number tokenizes as a training one does; the space before a capital letter is a token of its
own, so a name is the same tokens after a space, a quote or a newline (copying it into a JSON string
is a plain copy). Lower-case words keep their leading space, as in GPT-2's BPE: isolating every space
made the next token after a space depend on two tokens back, which the model did not learn to copy
(the training notes in docs/demo-model.md). Encoding adds no BOS.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kvloom.demo_model.corpus import TASKS, generate
from kvloom.demo_model.template import DEMO_CHAT_TEMPLATE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>")


def render(example_messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           *, add_generation_prompt: bool = False) -> str:
    """The chat template applied as transformers applies it (its compiled jinja, its ``tojson``)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(DEMO_CHAT_TEMPLATE)
    return str(template.render(messages=example_messages, tools=tools, add_generation_prompt=add_generation_prompt))


def _texts(seed: int, count: int) -> Iterator[str]:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(DEMO_CHAT_TEMPLATE)
    rng = random.Random(seed)
    names = sorted(TASKS)
    for _ in range(count):
        example = generate(rng.choice(names), rng, "train")
        yield str(template.render(messages=example.messages, tools=example.tools))


def train_tokenizer(vocab_size: int, *, seed: int = 0, examples: int = 20_000) -> PreTrainedTokenizerFast:
    """Train the BPE on ``examples`` rendered training-split chats (every task equally often)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # " Brizo" and '"Brizo' must hold the same tokens for a name to be copied from a sentence into a
        # JSON string: the space before a capital letter is a token of its own.
        pre_tokenizers.Split(Regex(" (?=\\p{Lu})"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKERS), min_frequency=4, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_texts(seed, examples), trainer=trainer)
    tokenizer_cls: Any = PreTrainedTokenizerFast
    hf_tok: PreTrainedTokenizerFast = tokenizer_cls(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], pad_token=SPECIAL_TOKENS[2],
        additional_special_tokens=list(SPECIAL_TOKENS[3:]), clean_up_tokenization_spaces=False,
    )
    hf_tok.add_tokens(list(MARKERS))
    hf_tok.chat_template = DEMO_CHAT_TEMPLATE
    if hf_tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) != [0, 1, 2, 3, 4]:
        raise AssertionError("special tokens must hold ids 0..4")
    return hf_tok
