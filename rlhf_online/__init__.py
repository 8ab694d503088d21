"""rlhf-online: serve a LoRA policy, learn from live feedback, publish better adapters safely."""

__version__ = "0.1.0"
