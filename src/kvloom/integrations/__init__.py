"""Front doors for frameworks: LangChain, LlamaIndex, an OpenAI-compatible app, and the runtime they share."""
