"""`rlhf-online demo`: the whole loop on one machine, from simulated users' thumbs to a better served policy.

1. provision the default model (once), 2. start the Generation, Reward and Trainer services on
loopback with the embedded defaults (SQLite, a local adapter registry) in runs/<timestamp>/,
3. let simulated users ask and rate for `--minutes` while the reward model retrains and the
trainer runs PPO rounds whose adapters every request after a swap is served with, printing
progress, 4. stop everything, then judge the base and the final policy on the held-out prompts
with fixed seeds and write report.json, report.md and report.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_online import config
from rlhf_online.canary.config import CanaryConfig
from rlhf_online.config import TrainerSettings, group
from rlhf_online.errors import ConfigError
from rlhf_online.ppo.config import PPOConfig, TrainerConfig


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; each is a flag of `rlhf-online demo`."""

    minutes: float = 10.0  # how long the simulated users ask and rate
    # Past --minutes, keep the users going until they rated a reply of a published version, for at most this
    # many more minutes (0 = stop at --minutes): a short run then always shows the whole loop, however slow the machine.
    until_served_minutes: float = 0.0
    # Past --minutes, keep the users going until their ratings promoted a version (CURRENT is a trained adapter), for at
    # most this many more minutes (0 = stop at --minutes). Users' ratings decide canaries, and a slower machine serves
    # fewer of them a minute (an AVX2-only EPYC served 249 requests in 5 minutes where an AVX-512 one served 536-613):
    # `make demo` sets 10, so that there too the run ends on a version its users chose. The report says how long.
    until_promoted_minutes: float = 0.0
    # Concurrent simulated users. 12, not 6: users wait for their replies, so the serving engine sets the pace, and
    # it decodes 24 rows for little more than 12 (its cost is streaming the weights: on one thread a step of 24 rows
    # took 57 ms, of 12 rows 44 ms, 1.5x the tokens a second), so canaries are decided sooner (docs/benchmarks.md).
    users: int = 12
    personas: str = "polite,positive"  # their kinds, assigned round-robin (see simulate.judges.PERSONAS)
    pair_fraction: float = 1.0  # share of requests with n=2 (one prefill, two candidates) and a preference
    # K in 2..8: those requests ask for K candidates and send one ranking of all K instead (0: n=2 and a preference).
    rank_n: int = 0
    # Users rate each reply with this probability and send a pair's preference with it too (1.0: everything rated).
    rated_fraction: float = 1.0
    max_new_tokens: int = 32  # reply length for users, PPO rollouts and the held-out evaluation alike
    temperature: float = 1.0  # sampling temperature for users and the held-out evaluation
    heldout_samples: int = 10  # replies per held-out prompt and policy in the final evaluation (CIs ~ 1/sqrt)
    heldout_prompts: int = 0  # 0 = all held-out prompts
    base_model: str = "smollm2-135m-instruct"
    data_dir: str = "data"  # where the provisioned model lives
    runs_dir: str = "runs"
    serving_threads: int = 1  # torch threads of the generation service (the three services share the cores)
    training_threads: int = 1  # torch threads of the trainer
    reward_threads: int = 1
    # The trainer's PPO knobs: a larger lr than the service's (PPO's early stop on approx. KL bounds each
    # round's step) and a smaller starting KL penalty; response_length follows max_new_tokens.
    ppo: PPOConfig = group(PPOConfig, ("batch_size", "num_ppo_epochs", "num_mini_batches", "learning_rate",
                                       "init_kl_coef", "compute_dtype"),
                           learning_rate=1e-3, init_kl_coef=0.02)
    # Rounds back to back on the trainer's own rollouts, the gate on fewer held-out prompts and replies.
    # Rounds from the users' traffic (--learn-from-traffic true --round-interval-seconds 60 --num-ppo-epochs 2
    # --num-mini-batches 4) work here too, but in 10 minutes they cut toxicity less (docs/benchmarks.md, 2026-12-05):
    # 6 rounds of ~32 replies on one thread moved the policy less far (KL 5) than 16 back-to-back rounds of 8 (KL 11).
    # updates_per_round 3: the gate cost 15 of a one-update round's 30 s; with three updates a round and the canary on
    # every user, a candidate with 6 updates went live at minute 3.0-3.2 (one update a round: 5 updates at 3.3).
    trainer: TrainerConfig = group(TrainerConfig, ("kl_budget", "eval_prompts", "eval_samples_per_prompt",
                                                   "round_interval_seconds", "learn_from_traffic",
                                                   "logged_batch_size", "round_min_traffic", "min_logged_samples",
                                                   "updates_per_round", "round_kl_stop", "kl_pressure_rate"),
                                   round_interval_seconds=1.0, round_min_feedback=0, eval_prompts=12,
                                   eval_samples_per_prompt=2, learn_from_traffic=False, logged_batch_size=64,
                                   round_min_traffic=32, min_logged_samples=32, updates_per_round=3)
    # Canaries, on here (the service leaves them off unless --canary true): each candidate serves this share of the
    # users, sticky per user, until their ratings promote or roll it back. Every user, not the service's 20%: the
    # demo's users all ask for two candidates, so each of their requests is an interleaved pair (one candidate from
    # the canary, one from the stable version) and shows them the canary in half of their replies. Pairs are the
    # test's most sensitive evidence: at 100% a canary got 60 judged pairs a minute, at 50% 37 (docs/benchmarks.md).
    canary_percent: float = 100.0
    # canary_same_users: with --canary-percent below 100 the users in the share (6 of two personas at 50) are no random
    # sample of the 12 (canary.config); at 100 they are everyone and it changes nothing.
    # canary_replace_after: the first candidates differ little from the base and would hold the canary slot
    # for minutes undecided while better-trained ones queue; 60 judged completions is about a minute here.
    # canary_max_looks: one leaning to "better" is not replaced, and held the slot for 9 of the 10 minutes
    # in a run (+6.7 points, se 4.7); after 150 judged completions (2-3 minutes) its lean decides.
    # canary_min_rounds: a candidate goes live with 2 rounds (6 updates) past CURRENT: the first rounds' candidates
    # (3-4 updates) were rated 7 points worse than the base in two runs of two, and one leaning to "better" would
    # hold the slot while the candidates that decide queue behind it (docs/benchmarks.md). A round takes about a minute
    # here, so a candidate that waited 2 minutes as the newest is one the trainer stopped building on (the KL budget).
    canary: CanaryConfig = group(CanaryConfig, ("canary", "canary_timeout_seconds", "canary_same_users",
                                                "canary_replace_after", "canary_max_looks", "canary_min_rounds",
                                                "canary_queue_timeout_seconds"),
                                 canary=True, canary_poll_seconds=2.0, canary_same_users=True, canary_replace_after=60,
                                 canary_max_looks=150, canary_min_rounds=2, canary_queue_timeout_seconds=120.0)
    reward_retrain_min_feedback: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject values the demo cannot run with, naming the flag (the nested configs check their own)."""
        positive = ("minutes", "users", "max_new_tokens", "heldout_samples", "serving_threads", "training_threads",
                    "reward_threads", "reward_retrain_min_feedback")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (want > 0); set --{_flag(name)}")
        for name in ("heldout_prompts", "until_served_minutes", "until_promoted_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r} (want >= 0); set --{_flag(name)}")
        if not 0 <= self.canary_percent <= 100:
            raise ConfigError(f"canary_percent: invalid value {self.canary_percent!r} (want 0..100); "
                              f"set --{_flag('canary_percent')}")
        if not 0 < self.rated_fraction <= 1:
            raise ConfigError(f"rated_fraction: invalid value {self.rated_fraction!r} (want 0 < F <= 1); "
                              f"set --{_flag('rated_fraction')}")
        from rlhf_online.simulate.users import MAX_RANK_N

        if self.rank_n != 0 and not 2 <= self.rank_n <= MAX_RANK_N:
            raise ConfigError(f"rank_n: invalid value {self.rank_n!r} (want 0 or 2..{MAX_RANK_N}); "
                              f"set --{_flag('rank_n')}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per DemoConfig setting (the nested configs' named fields included)."""
    for s in config.settings_of(DemoConfig):
        p.add_argument(f"--{_flag(s.name)}", dest=s.name, type=s.type, default=s.default, help=f"[default {s.default}]")


def service_envs(cfg: DemoConfig, model: Path, state: Path, reward_port: int) -> dict[str, dict[str, str]]:
    """RLHF_* settings of the three services for the demo (everything else: the embedded defaults)."""
    ppo = dataclasses.replace(cfg.ppo, response_length=cfg.max_new_tokens)
    common = {"RLHF_BASE_MODEL": str(model), "RLHF_DATA_DIR": str(state),
              "RLHF_STORE_URL": f"sqlite:///{state / 'rlhf.db'}", "RLHF_ADAPTER_DIR": str(state / "adapters"),
              "RLHF_GRACE_SECONDS": "5"}
    return {
        "generation": {**common, "RLHF_TORCH_THREADS": str(cfg.serving_threads), "RLHF_ADAPTER_POLL_SECONDS": "1",
                       "RLHF_MAX_BATCH_SIZE": "16", "RLHF_CANARY_PERCENT": str(cfg.canary_percent),
                       # The simulated users are the demo's own load, rating as fast as replies come (on a
                       # small model, faster than any person): the per-user feedback limit is for real users.
                       "RLHF_FEEDBACK_RATE_PER_USER": "0"},
        "reward": {**common, "RLHF_TORCH_THREADS": str(cfg.reward_threads),
                   "RLHF_RETRAIN_MIN_FEEDBACK": str(cfg.reward_retrain_min_feedback),
                   "RLHF_RETRAIN_INTERVAL_SECONDS": "10"},
        "trainer": {**common, "RLHF_TORCH_THREADS": str(cfg.training_threads),
                    "RLHF_REWARD_ADDR": f"127.0.0.1:{reward_port}",
                    **config.group_env(TrainerSettings, trainer=cfg.trainer, ppo=ppo, canary_controller=cfg.canary)},
    }


def user_pool_config(cfg: DemoConfig):
    """The simulated users' settings of the demo."""
    from rlhf_online.simulate.users import UserPoolConfig

    return UserPoolConfig(users=cfg.users, personas=tuple(cfg.personas.split(",")), pair_fraction=cfg.pair_fraction,
                          rank_n=cfg.rank_n, rated_fraction=cfg.rated_fraction, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, seed=cfg.seed)


def users_go_on(cfg: DemoConfig, minutes: float, *, served: bool, promoted: bool) -> list[str]:
    """What keeps the users going `minutes` into the run (empty: they stop): the minutes asked for, then the until_*
    waits whose time is not up and whose event has not happened (served: users rated a reply of a published
    version; promoted: one serves everyone)."""
    past = minutes - cfg.minutes
    if past < 0:
        return [f"the {cfg.minutes:g} minutes asked for"]
    return [f"{what}, for at most {limit:g} more minutes" for what, limit, happened in (
        ("they rated a reply of a published version", cfg.until_served_minutes, served),
        ("their ratings promoted a version", cfg.until_promoted_minutes, promoted)) if past < limit and not happened]


def run_loop(cfg: DemoConfig, model: Path, run_dir: Path):
    """Start the services and the users, show progress for cfg.minutes (or longer: until_*), stop; returns
    (monitor, pool stats, how long the users ran: users_minutes, and users_waited_for past --minutes)."""
    from rlhf_online import launch
    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.report.timeline import Monitor
    from rlhf_online.simulate.users import UserPool

    state, logs = run_dir / "state", run_dir / "logs"
    state.mkdir(parents=True)
    logs.mkdir()
    reward_port = launch.free_port()
    envs = service_envs(cfg, model, state, reward_port)
    users = user_pool_config(cfg)
    prompts = [p.prompt for p in load_prompts("train")]
    with contextlib.ExitStack() as stack:
        print(f"Starting the reward, generation and trainer services (logs in {logs}) ...", flush=True)
        services = {"reward": stack.enter_context(launch.running("reward", envs["reward"], logs, port=reward_port))}
        services["generation"] = stack.enter_context(launch.running("generation", envs["generation"], logs))
        # The trainer stops first (ExitStack unwinds in reverse); a round in hand may take a while to finish.
        services["trainer"] = stack.enter_context(launch.running("trainer", envs["trainer"], logs, stop_timeout=180))
        ports = {name: s.port for name, s in services.items()}
        print(f"Services up: generation :{ports['generation']}, reward :{ports['reward']}, trainer :{ports['trainer']}."
              f" {cfg.users} simulated users for {cfg.minutes:g} minutes.\n", flush=True)
        pool = UserPool(f"127.0.0.1:{ports['generation']}", prompts, users, run_dir / "ratings.jsonl").start()
        monitor = Monitor(*(f"127.0.0.1:{ports[s]}" for s in ("generation", "reward", "trainer")), pool, run_dir)
        deadline = monitor.t0 + cfg.minutes * 60
        registry = AdapterRegistry(state / "adapters")

        next_line, waited_for = 0.0, []
        try:
            # "" alone in versions_rated: nothing published was served yet; current() "": the bare base serves everyone
            while waits := users_go_on(cfg, minutes := (time.time() - monitor.t0) / 60,
                                       served=any(pool.versions_rated()), promoted=bool(registry.current())):
                if minutes >= cfg.minutes and not waited_for:
                    print(f"\n{cfg.minutes:g} minutes passed; the users go on until {' and '.join(waits)}.\n",
                          flush=True)
                    waited_for = waits
                now = time.time()
                time.sleep(min(5.0, deadline - now) if now < deadline else 1.0)
                snap = monitor.poll()
                if snap.t >= next_line:
                    print(monitor.line(snap), flush=True)
                    next_line = snap.t + 15
        finally:
            users_ran = {"users_minutes": round((time.time() - monitor.t0) / 60, 2), "users_waited_for": waited_for}
            pool.stop()
            print("\nUsers stopped; waiting for the round in progress to finish ...", flush=True)
        with contextlib.suppress(Exception):  # record a round that finished after the last poll
            give_up = time.time() + 300
            while _round_in_progress(monitor) and time.time() < give_up:
                time.sleep(0.2)  # the scheduler pauses a second between rounds: stop the trainer in that gap
            print(monitor.line(monitor.poll()), flush=True)
    return monitor, pool.stats, users_ran


def _heldout_replies(model: Path, final: Path | None, prompts: list[str], hcfg, data_dir: Path
                     ) -> dict[str, list[str]]:
    """The base's and the final policy's held-out replies; the base's from an earlier run when it left them."""
    from rlhf_online.report import heldout

    cache_dir = data_dir / "heldout-cache"
    key = heldout.base_cache_key(model, prompts, hcfg, dtype="auto")
    base = heldout.cached_base_replies(cache_dir, key, len(prompts) * hcfg.samples)
    if base is None:  # the base's replies, and the final policy's in the same batches
        texts = heldout.generate(model, {"base": None, **({"final": final} if final else {})}, prompts, hcfg)
        base = texts["base"]
        heldout.store_base_replies(cache_dir, key, base)
    else:
        print(f"  the bare base's {len(base)} replies: from an earlier run ({cache_dir})", flush=True)
        texts = heldout.generate(model, {"final": final}, prompts, hcfg) if final else {}
    # A final policy that is the bare base (nothing promoted) is judged on the base's own replies.
    return {"base": base, "final": texts["final"] if final else list(base)}


def _round_in_progress(monitor) -> bool:
    """Whether the trainer is in a round, asked over the monitor's channel (one channel, not one per poll)."""
    from rlhf_online.v1 import trainer_pb2

    return monitor.trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).round_in_progress


def _version_rows(registry, stats) -> list[dict]:
    """Each served version's traffic and noise-free thumbs-up rate vs its parent's (parents from the manifests)."""
    from rlhf_online.report import versions

    # describe(), not manifest(): the parent is all we read here, and hashing every adapter again buys nothing.
    parents = {m["version"]: m.get("parent", "") for m in registry.describe()}
    return versions.version_rows(stats.served_by_version, stats.by_version, parents,
                                 by_user=stats.served_by_version_user)


def _worse_line(rows: list[dict]) -> str:
    """The summary's sentence on versions worse than their parent (noise-free thumbs-up, 95% CI)."""
    from rlhf_online.report.versions import worse_than_parent

    compared = sum(r["vs_parent"] is not None for r in rows)
    worse = worse_than_parent(rows)
    if not worse:
        return (f"Versions compared with their parent on the noise-free thumbs-up rate of their traffic: {compared}, "
                "none clearly worse." if compared else "No published version served replies to compare with its parent.")
    return "Worse than its parent on the noise-free thumbs-up rate (95% CI below 0): " + ", ".join(
        f"{r['version']} ({r['vs_parent']['difference']:+.3f} vs {r['vs_parent']['compared_with'] or 'base'})"
        for r in worse) + "."


def main(args: argparse.Namespace) -> int:
    """Run the loop, evaluate base vs final on held-out prompts, write the report."""
    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.artifacts import write_atomically
    from rlhf_online.bench.common import machine
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.models.provision import resolve_base_model
    from rlhf_online.report import heldout, plot, write

    cfg = config.assemble(DemoConfig, {s.name: getattr(args, s.name) for s in config.settings_of(DemoConfig)})
    t0 = time.time()
    model = resolve_base_model(cfg.base_model, Path(cfg.data_dir))
    run_dir = Path(cfg.runs_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    print(f"rlhf-online demo: {model.name}, run directory {run_dir}", flush=True)
    monitor, stats, users_ran = run_loop(cfg, model, run_dir)
    loop_seconds = time.time() - t0

    registry = AdapterRegistry(run_dir / "state" / "adapters")
    final = registry.current()
    kl = float(registry.manifest(final)["metrics"].get("eval/kl", float("nan"))) if final else 0.0
    prompts = [p.prompt for p in load_prompts("heldout")][: cfg.heldout_prompts or None]
    hcfg = heldout.HeldoutConfig(samples=cfg.heldout_samples, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, seed=cfg.seed + 20261124)
    print(f"\nJudging the base and the final policy ({final or 'bare base'}) on {len(prompts)} held-out prompts x "
          f"{hcfg.samples} replies, fixed seeds ...", flush=True)
    texts = _heldout_replies(model, registry.path(final) if final else None, prompts, hcfg, Path(cfg.data_dir))
    personas = cfg.personas.split(",")
    judged = {label: heldout.judge(texts[label], personas) for label in texts}
    summary = {label: heldout.summarize(j, seed=cfg.seed) for label, j in judged.items()}
    extra = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
             "minutes": cfg.minutes, **users_ran, "users": cfg.users, "personas": personas,
             "loop_seconds": round(loop_seconds, 1),
             "heldout_prompts": len(prompts), "heldout_samples": hcfg.samples, "config": config.flatten(cfg),
             "requests": stats.requests, "completions": stats.completions, "ratings": stats.ratings,
             "preferences": stats.preferences, "rankings": stats.rankings, "failed_requests": sum(stats.errors.values()),
             "reward_model": monitor.snapshots[-1].reward_version if monitor.snapshots else "",
             "reward_accuracy": monitor.snapshots[-1].reward_accuracy if monitor.snapshots else float("nan")}
    from rlhf_online.report import canaries

    version_rows = _version_rows(registry, stats)
    canary_rows = canaries.canary_rows(registry.decisions(), monitor.t0, cfg.canary_percent)
    extra["canaries"] = canary_rows
    extra["promoted_but_worse"] = canaries.promoted_but_worse(canary_rows, version_rows)
    extra["promotion_lag_minutes"] = canaries.promotion_lag_minutes(canary_rows)
    report = write.build_report(summary, kl=kl, kl_budget=cfg.trainer.kl_budget, rounds=monitor.rounds,
                                wall_seconds=time.time() - t0, final_version=final, extra=extra,
                                versions=version_rows)
    by_version = {v: list(x) for v, x in stats.by_version.items()}
    write_atomically(run_dir / "report.png", lambda tmp: plot.plot(tmp, monitor.snapshots, monitor.rounds,
                                                                   by_version, summary, cfg.trainer.kl_budget,
                                                                   dict(stats.served_by_version)))
    write.write(run_dir, report, write.markdown(report, monitor.rounds, by_version))
    with open(run_dir / "heldout_replies.jsonl", "w") as f:
        import json

        for label, j in judged.items():
            for text, tox, sent in zip(j.texts, j.toxicity, j.sentiment, strict=True):
                f.write(json.dumps({"policy": label, "text": text, "toxicity": tox, "sentiment": sent}) + "\n")
    b, fi = report["base"], report["final"]
    print(f"\nHeld-out, base -> final: toxicity {b['toxicity']:.4f} -> {fi['toxicity']:.4f} "
          f"({100 * report['toxicity_change']:+.1f}%), sentiment {b['sentiment']:+.3f} -> {fi['sentiment']:+.3f}, "
          f"thumbs-up {b['thumbs_up_rate']:.2f} -> {fi['thumbs_up_rate']:.2f}; KL {kl:.2f} (budget {cfg.trainer.kl_budget:g}); "
          f"{report['rounds']} rounds in {report['wall_seconds']:.0f} s.")
    print(_worse_line(report["versions"]))
    if cfg.canary.canary:
        outcomes = [c["outcome"] for c in canary_rows]
        print(f"Canaries: {outcomes.count('promoted')} promoted, {outcomes.count('rolled_back')} rolled back, "
              f"{outcomes.count('live')} still live, {outcomes.count('queued')} queued; published to CURRENT in "
              f"{', '.join(f'{m:.1f}' for m in report['promotion_lag_minutes']) or '-'} minutes; promoted although "
              f"users rated them worse than their parent: {', '.join(report['promoted_but_worse']) or 'none'}.")
    print(f"Report: {run_dir / 'report.md'} (plot {run_dir / 'report.png'}, data {run_dir / 'report.json'})")
    os.sync()
    return 0
