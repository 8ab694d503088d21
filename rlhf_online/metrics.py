"""Prometheus metrics (prefix `rlhf_`), defined once per process and shared by every service in it."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

# --- every gRPC service (recorded by the metrics interceptor) ---
GRPC_REQUESTS = Counter("rlhf_grpc_requests_total", "RPCs handled, by service, method and status code.",
                        ["service", "method", "code"])
GRPC_LATENCY = Histogram("rlhf_grpc_request_duration_seconds", "RPC latency, by service, method and status code.",
                         ["service", "method", "code"], buckets=_LATENCY_BUCKETS)

# --- the TGI-compatible HTTP API (recorded by its middleware) ---
HTTP_REQUESTS = Counter("rlhf_http_requests_total", "HTTP requests handled, by route and status.", ["route", "status"])
HTTP_LATENCY = Histogram("rlhf_http_request_duration_seconds", "HTTP request latency, by route and status.",
                         ["route", "status"], buckets=_LATENCY_BUCKETS)

# --- generation engine ---
TIME_TO_FIRST_TOKEN = Histogram("rlhf_generation_time_to_first_token_seconds",
                                "From admission to the queue until the first token of a request.",
                                buckets=_LATENCY_BUCKETS)
TOKENS_GENERATED = Counter("rlhf_generation_tokens_total", "Completion tokens generated.")
PROMPT_TOKENS = Counter("rlhf_generation_prompt_tokens_total", "Prompt tokens prefilled.")
BATCH_SIZE = Histogram("rlhf_generation_batch_size", "Rows in each decode step.",
                       buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
QUEUE_DEPTH = Gauge("rlhf_generation_queue_depth", "Requests waiting to join the batch.")
RUNNING_ROWS = Gauge("rlhf_generation_running_rows", "Candidates being decoded now.")
REQUESTS_FINISHED = Counter("rlhf_generation_requests_total", "Generation requests by outcome.", ["outcome"])

# --- feedback and policy ---
FEEDBACK = Counter("rlhf_feedback_total", "Feedback newly recorded, by rating.", ["rating"])
FEEDBACK_DUPLICATES = Counter("rlhf_feedback_duplicates_total", "Feedback repeats that were counted once.")
PREFERENCES = Counter("rlhf_preferences_total", "Pairwise preferences newly recorded.")
FEEDBACK_REFUSED = Counter("rlhf_feedback_refused_total", "Ratings, preferences and rankings refused before "
                           "the store: user_rate_limit, key_rate_limit, not_served_to_caller.", ["reason"])
RANKINGS = Counter("rlhf_rankings_total", "Rankings newly recorded, by how many completions they rank.", ["size"])
COMPLETIONS_LOGGED = Counter("rlhf_completions_logged_total", "Completions written to the store.")
POLICY_VERSION = Gauge("rlhf_policy_version", "Policy version served for new requests by role: stable (CURRENT) or "
                       "canary (CANARY, a share of users); N of vN, 0 = bare base or no canary.", ["role"])
ADAPTERS_LOADED = Gauge("rlhf_adapters_loaded", "LoRA adapters resident in this replica.")


# --- adapter hot-swap ---
ADAPTER_SWAPS = Counter("rlhf_adapter_swaps_total", "Policy version switches by outcome.", ["outcome"])
ADAPTER_SWAP_SECONDS = Histogram("rlhf_adapter_swap_duration_seconds", "From seeing a new CURRENT to serving it.",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))

# --- canary controller (trainer) ---
CANARY_DECISIONS = Counter("rlhf_canary_decisions_total", "Canary candidates decided, by outcome: promoted, "
                           "rolled_back, timed_out, truncated_promoted / truncated_rolled_back (canary_max_looks), "
                           "overridden (by an operator), superseded, discarded.", ["outcome"])
CANARY_EVIDENCE = Gauge("rlhf_canary_evidence", "The live canary's evidence: canary_rated, stable_rated, pairs, "
                        "delta (thumbs-up rate, canary minus stable), llr (the sequential test's statistic).", ["kind"])

# --- trainer ---
TRAINER_ROUNDS = Counter("rlhf_trainer_rounds_total", "PPO rounds by outcome.", ["outcome"])
TRAINER_ROUND_SECONDS = Histogram("rlhf_trainer_round_duration_seconds", "Duration of PPO rounds.",
                                  buckets=(5, 10, 20, 40, 60, 120, 240, 480, 960))
PPO_STATS = Gauge("rlhf_ppo_stat", "Last round's PPO statistics by TRL-style name (objective/kl, policy/clipfrac, ...).",
                  ["name"])
KL_COEF = Gauge("rlhf_ppo_kl_coef", "Current beta of the per-token KL penalty.")

# --- reward service ---
REWARD_SCORES = Histogram("rlhf_reward_score", "Scores returned by the reward service.",
                          buckets=(-10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10))
REWARD_MODEL_VERSION = Gauge("rlhf_reward_model_version", "Learned reward model version served (N of rN; 0 = untrained).")
REWARD_ACCURACY = Gauge("rlhf_reward_heldout_accuracy", "Held-out accuracy of the served learned reward model.", ["kind"])
REWARD_TRAINING_SECONDS = Histogram("rlhf_reward_training_seconds", "Duration of reward-model trainings.",
                                    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300))
REWARD_TRAININGS = Counter("rlhf_reward_trainings_total", "Reward-model trainings by outcome.", ["outcome"])
REWARD_SCORED_ITEMS = Counter("rlhf_reward_scored_items_total", "Items scored, by source: users' ratings of the "
                              "completion (with the model's score as a prior) or the model alone.", ["source"])
REWARD_FEEDBACK_SEEN = Gauge("rlhf_reward_feedback_seen", "Feedback (ratings, preferences and rankings) the served model was trained on.")


def version_number(version: str) -> int:
    """`v000012` (or `r000012`) -> 12; the bare base or an untrained model ("") -> 0."""
    digits = version.lstrip("vr")
    return int(digits) if digits.isdigit() else 0


def serve_metrics(port: int, addr: str = "0.0.0.0") -> int:
    """Expose /metrics over HTTP in a daemon thread; return the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=addr)
    return int(server.server_port)
