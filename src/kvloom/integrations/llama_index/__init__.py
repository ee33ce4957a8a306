"""LlamaIndex integration (``pip install kvloom[llama-index]``): ``KVLoomLLM``, a
``FunctionCallingLLM`` on a kvloom engine in the same process.

```python
from llama_index.core import Settings
from kvloom.integrations.llama_index import KVLoomLLM

Settings.llm = KVLoomLLM(model_path="path/to/Qwen2.5-0.5B-Instruct", max_tokens=512)
```
"""

try:  # first, so that without the extra the error says which one to install
    import llama_index.core  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        f"kvloom.integrations.llama_index needs LlamaIndex: pip install 'kvloom[llama-index]' ({exc})", name=exc.name,
    ) from exc

from kvloom.integrations.llama_index.llm import KVLoomLLM

__all__ = ["KVLoomLLM"]
