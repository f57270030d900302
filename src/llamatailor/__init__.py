"""llamatailor: fine-tune a Llama-family model for one job, from raw examples to a served model."""

__version__ = "0.1.0"
