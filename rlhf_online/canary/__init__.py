"""Canary versions of the LoRA policy: routing a share of users to them, the sequential test, the controller."""
