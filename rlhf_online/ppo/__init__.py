"""KL-regularized PPO on a LoRA policy: config, the math (core), and the round's steps."""
