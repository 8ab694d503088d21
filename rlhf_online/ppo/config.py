"""Every PPO knob and every knob of the trainer's loop, one documented field each, declared here only.

Names follow TRL's PPOConfig where TRL has the knob. The Trainer service and the demo expose some
of them as flags and RLHF_* env variables generated from these fields (rlhf_online.config.group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_online.errors import ConfigError


def knob(default: Any, help: str) -> Any:
    """A dataclass field with its documentation (also the --help of the flags made from it)."""
    return field(default=default, metadata={"help": help})


def _refuse(obj: Any, checks: dict[str, tuple[bool, str]]) -> None:
    """Raise ConfigError naming the first field whose check failed, its value and what is wanted."""
    for name, (ok, want) in checks.items():
        if not ok:
            raise ConfigError(f"{name}: invalid value {getattr(obj, name)!r} (want {want})")


@dataclass(frozen=True)
class PPOConfig:
    """Settings of one PPO round (defaults sized for SmolLM2-135M on a 2-core CPU)."""

    # --- rollouts ---
    batch_size: int = knob(8, "rollouts the trainer samples itself in a round that has too little logged traffic")
    response_length: int = knob(32, "max new tokens per rollout")
    temperature: float = knob(1.0, "sampling temperature of rollouts")
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of a rollout that did not end with EOS")
    # --- rewards and advantages ---
    init_kl_coef: float = knob(0.05, "initial beta of the per-token KL penalty")
    adaptive_kl: bool = knob(True, "adapt beta towards target_kl (Ziegler et al.); false keeps it fixed")
    target_kl: float = knob(6.0, "target KL (nats per response) of the adaptive controller")
    kl_horizon: int = knob(10000, "horizon of the adaptive KL controller, in samples")
    gamma: float = knob(1.0, "discount")
    lam: float = knob(0.95, "GAE lambda")
    whiten_rewards: bool = knob(False, "whiten per-token rewards before GAE")
    prompt_baseline: bool = knob(True, "score minus the mean score of the batch's other replies to the same prompt "
                                       "(RLOO's leave-one-out baseline; a user's n>=2 candidates), before GAE")
    # --- update ---
    num_ppo_epochs: int = knob(4, "PPO epochs per round")
    num_mini_batches: int = knob(1, "minibatches (optimizer steps) per epoch")
    per_device_train_batch_size: int = knob(8, "rows per forward/backward pass; a minibatch accumulates its gradient")
    local_rollout_forward_batch_size: int = knob(16, "rows per no-grad forward pass when measuring a batch")
    learning_rate: float = knob(3e-4, "LoRA learning rate")
    max_grad_norm: float = knob(1.0, "gradient norm clip")
    cliprange: float = knob(0.2, "epsilon of the clipped surrogate")
    cliprange_value: float = knob(0.2, "clip of the value update around the old values")
    vf_coef: float = knob(0.1, "weight of the value loss")
    early_stop_approxkl: float = knob(0.1, "stop the epochs once the policy moved this far (approx. KL); 0 = never")
    # --- LoRA ---
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: int = knob(32, "LoRA alpha")
    lora_dropout: float = knob(0.0, "LoRA dropout")
    lora_target_modules: tuple[str, ...] = knob(("q_proj", "k_proj", "v_proj", "o_proj"), "modules LoRA adapts")
    seed: int = knob(0, "seed of the rollouts' prompt choice")
    # --- precision ---
    compute_dtype: str = knob("auto", "dtype of the body's matmuls in every forward/backward pass (autocast; the "
                                         "weights, the vocabulary projection and the losses stay fp32): float32, "
                                         "bfloat16, or auto (bfloat16 where the CPU or GPU computes it natively)")
    shared_prefix_min_tokens: int = knob(8, "a pass computes the tokens all its rows start with (a chat template's "
                                            "system prompt) once when there are at least this many; 0 = never")

    def __post_init__(self) -> None:
        """Reject values PPO cannot run with, naming the field."""
        _refuse(self, {
            "batch_size": (self.batch_size >= 1, ">= 1"), "response_length": (self.response_length >= 1, ">= 1"),
            "temperature": (self.temperature > 0, "> 0"), "init_kl_coef": (self.init_kl_coef >= 0, ">= 0"),
            "target_kl": (self.target_kl > 0, "> 0"), "kl_horizon": (self.kl_horizon > 0, "> 0"),
            "gamma": (0 <= self.gamma <= 1, "in 0..1"), "lam": (0 <= self.lam <= 1, "in 0..1"),
            "num_ppo_epochs": (self.num_ppo_epochs >= 1, ">= 1"),
            "num_mini_batches": (1 <= self.num_mini_batches <= self.batch_size, "in 1..batch_size"),
            "per_device_train_batch_size": (self.per_device_train_batch_size >= 1, ">= 1"),
            "local_rollout_forward_batch_size": (self.local_rollout_forward_batch_size >= 1, ">= 1"),
            "learning_rate": (self.learning_rate > 0, "> 0"), "cliprange": (0 < self.cliprange < 1, "in (0, 1)"),
            "cliprange_value": (self.cliprange_value > 0, "> 0"), "vf_coef": (self.vf_coef >= 0, ">= 0"),
            "early_stop_approxkl": (self.early_stop_approxkl >= 0, ">= 0"), "lora_r": (self.lora_r >= 1, ">= 1"),
            "shared_prefix_min_tokens": (self.shared_prefix_min_tokens >= 0, ">= 0"),
            "compute_dtype": (self.compute_dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
        })


@dataclass(frozen=True)
class TrainerConfig:
    """The loop around PPO rounds: when one runs, how its candidate is gated, how many versions are kept."""

    round_interval_seconds: float = knob(600.0, "run a round at least this often (0 = only on feedback or RunRound)")
    round_min_feedback: int = knob(64, "run a round once this much new feedback arrived (0 = off)")
    round_min_traffic: int = knob(32, "run a round once the served version logged this many new completions (0 = off)")
    learn_from_traffic: bool = knob(True, "train on the completions the served version logged (on-policy, "
                                          "rewarded by their users' ratings); false: only the trainer's own rollouts")
    logged_batch_size: int = knob(128, "most logged completions one round trains on (the newest of the served version)")
    min_logged_samples: int = knob(32, "on-policy logged completions a round needs to train on them alone; with "
                                       "fewer it tops them up with batch_size rollouts of its own")
    logged_max_user_share: float = knob(0.25, "most of a round's logged batch one user's completions may fill (per "
                                              "tenant and user_id, for completions served with an API key), so one "
                                              "user's traffic cannot be the batch (1 = no cap)")
    max_logged_prompt_tokens: int = knob(1024, "logged completions with longer prompts are left out of rounds")
    max_logged_response_tokens: int = knob(128, "logged completions with longer replies are left out of rounds")
    gate_min_samples: int = knob(16, "held-out logged completions of the served version needed to judge a candidate "
                                     "on them (fewer: the gate samples replies to eval_prompts instead)")
    gate_min_ess: float = knob(0.25, "share of the held-out samples' effective sample size a candidate must keep "
                                     "to be judged on logged traffic (lower: it moved too far; the gate samples)")
    min_prompts: int = knob(4, "logged prompts needed before a round runs (fewer: the round is skipped)")
    prompt_window: int = knob(10000, "the trainer's own rollouts and the gate draw prompts from the newest this many "
                                     "logged completions (a bounded read: a round's store time does not grow "
                                     "with the history)")
    updates_per_round: int = knob(1, "PPO updates a round makes before its one gate and publish: the first on the "
                                     "round's batch, each further one on batch_size fresh rollouts of the policy "
                                     "as it is by then (the gate costs as much as several updates)")
    kl_budget: float = knob(12.0, "the gate's ceiling on held-out KL to the reference (nats per response)")
    round_kl_stop: float = knob(0.75, "a round makes no further update once the KL of its newest rollouts (the policy "
                                      "as it is by then, nats per response) passes this share of kl_budget, so a "
                                      "round near the budget publishes the updates that fit instead of being "
                                      "refused whole (1: only the gate's check)")
    kl_pressure_rate: float = knob(1.0, "how fast the KL penalty rises while candidates' held-out KL is past the stop "
                                        "line (round_kl_stop of kl_budget; the budget when that is 1) and eases "
                                        "back under it: beta is multiplied by a factor >= 1 that each gated "
                                        "candidate moves by exp(rate * clip((KL - stop) / stop, -0.5, 1)), so "
                                        "rounds from a head near the budget trade reward for KL instead of "
                                        "overshooting (0 = off)")
    eval_prompts: int = knob(16, "held-out prompts the gate evaluates on")
    eval_samples_per_prompt: int = knob(4, "sampled replies per held-out prompt in the gate's evaluation")
    eval_seed: int = knob(1234, "sampling seed of the gate's evaluations (same for candidate and current)")
    keep_versions: int = knob(10, "published adapter versions kept in the registry")

    def __post_init__(self) -> None:
        """Reject values the loop cannot run with, naming the field."""
        _refuse(self, {
            "round_interval_seconds": (self.round_interval_seconds >= 0, ">= 0"),
            "round_min_feedback": (self.round_min_feedback >= 0, ">= 0"),
            "round_min_traffic": (self.round_min_traffic >= 0, ">= 0"),
            "min_prompts": (self.min_prompts >= 1, ">= 1"),
            "prompt_window": (self.prompt_window >= 1, ">= 1"),
            "logged_batch_size": (self.logged_batch_size >= 1, ">= 1"),
            "min_logged_samples": (self.min_logged_samples >= 1, ">= 1"),
            "logged_max_user_share": (0 < self.logged_max_user_share <= 1, "in (0, 1]"),
            "max_logged_prompt_tokens": (self.max_logged_prompt_tokens >= 1, ">= 1"),
            "max_logged_response_tokens": (self.max_logged_response_tokens >= 1, ">= 1"),
            "gate_min_samples": (self.gate_min_samples >= 2, ">= 2"),
            "gate_min_ess": (0 < self.gate_min_ess <= 1, "in (0, 1]"), "kl_budget": (self.kl_budget > 0, "> 0"),
            "round_kl_stop": (0 < self.round_kl_stop <= 1, "in (0, 1]"),
            "kl_pressure_rate": (self.kl_pressure_rate >= 0, ">= 0"),
            "updates_per_round": (self.updates_per_round >= 1, ">= 1"),
            "eval_prompts": (self.eval_prompts >= 1, ">= 1"),
            "eval_samples_per_prompt": (self.eval_samples_per_prompt >= 1, ">= 1"),
            "keep_versions": (self.keep_versions >= 1, ">= 1"),
        })
