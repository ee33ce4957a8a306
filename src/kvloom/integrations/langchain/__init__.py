"""LangChain integration (``pip install kvloom[langchain]``): ``ChatKVLoom`` (a chat model with
tool calling and structured output, both grammar-constrained) and ``KVLoom`` (a completion LLM),
on an in-process kvloom engine.

```python
from kvloom.integrations.langchain import ChatKVLoom

chat = ChatKVLoom(model_path="path/to/Qwen2.5-0.5B-Instruct", max_tokens=128)
print(chat.invoke("Hello!").content)
```
"""

from __future__ import annotations

try:  # first, so that without the extra the error says which one to install
    import langchain_core  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(f"kvloom.integrations.langchain needs LangChain: pip install 'kvloom[langchain]' ({exc})",
                              name=exc.name) from exc

from kvloom.integrations.langchain.chat_model import ChatKVLoom
from kvloom.integrations.langchain.llm import KVLoom

__all__ = ["ChatKVLoom", "KVLoom"]
