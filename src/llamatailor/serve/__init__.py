"""`llamatailor serve`: an OpenAI-compatible HTTP API over a GGUF file (llama.cpp) or a base with adapters."""
