"""Hugging Face integration (imports transformers/peft lazily, only from here)."""
