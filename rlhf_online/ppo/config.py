"""Every PPO knob, one documented field each; names follow TRL's PPOConfig where TRL has the knob."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_online.errors import ConfigError


@dataclass(frozen=True)
class PPOConfig:
    """Settings of one PPO round (defaults sized for SmolLM2-135M on a 2-core CPU)."""

    # --- rollouts ---
    batch_size: int = 8  # prompts per round; one rollout each
    response_length: int = 32  # max new tokens per rollout
    temperature: float = 1.0  # sampling temperature of rollouts
    missing_eos_penalty: float = 0.0  # subtracted from the score of a rollout that did not end with EOS
    # --- rewards and advantages ---
    init_kl_coef: float = 0.05  # beta at the start: per-token reward is -beta * KL(policy || reference)
    adaptive_kl: bool = True  # Ziegler et al. (2019) controller; False keeps beta fixed
    target_kl: float = 6.0  # the adaptive controller steers the rollouts' total KL towards this
    kl_horizon: int = 10000  # controller horizon, in samples
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False  # whiten per-token rewards before GAE
    # --- update ---
    num_ppo_epochs: int = 4  # passes over the rollouts per round
    num_mini_batches: int = 1  # minibatches per epoch
    learning_rate: float = 3e-4
    max_grad_norm: float = 1.0
    cliprange: float = 0.2  # epsilon of the clipped surrogate
    cliprange_value: float = 0.2  # clip of the value update around the old values
    vf_coef: float = 0.1  # weight of the value loss
    early_stop_approxkl: float = 0.1  # stop the epochs once the policy moved this far (approx. KL); 0 = never
    # --- LoRA ---
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject values PPO cannot run with, naming the field."""
        checks = {
            "batch_size": self.batch_size >= 1, "response_length": self.response_length >= 1,
            "temperature": self.temperature > 0, "init_kl_coef": self.init_kl_coef >= 0,
            "target_kl": self.target_kl > 0, "kl_horizon": self.kl_horizon > 0,
            "gamma": 0 <= self.gamma <= 1, "lam": 0 <= self.lam <= 1, "num_ppo_epochs": self.num_ppo_epochs >= 1,
            "num_mini_batches": 1 <= self.num_mini_batches <= self.batch_size, "learning_rate": self.learning_rate > 0,
            "cliprange": 0 < self.cliprange < 1, "cliprange_value": self.cliprange_value > 0,
            "vf_coef": self.vf_coef >= 0, "early_stop_approxkl": self.early_stop_approxkl >= 0,
            "lora_r": self.lora_r >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"{bad[0]}: invalid value {getattr(self, bad[0])!r}")
