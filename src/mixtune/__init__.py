"""mixtune: fast, correct QLoRA fine-tuning of Mixture-of-Experts language models."""

__version__ = "0.1.0"
