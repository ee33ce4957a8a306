"""LlamaIndex integration (``pip install kvloom[llama-index]``): ``KVLoomLLM``, a
``FunctionCallingLLM`` on a kvloom engine in the same process.

```python
from llama_index.core import Settings
from kvloom.integrations.llama_index import KVLoomLLM

Settings.llm = KVLoomLLM("path/to/Qwen2.5-0.5B-Instruct", max_tokens=512)
```
"""

from kvloom.integrations.llama_index.llm import KVLoomLLM

__all__ = ["KVLoomLLM"]
