"""Training: supervised fine-tuning with adapters, and its callbacks."""
