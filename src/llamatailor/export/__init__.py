"""merge, export (GGUF, Ollama) and their checks."""
