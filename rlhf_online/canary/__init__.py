"""Canary versions of the LoRA policy: the sequential test that promotes or rolls back a canary."""
