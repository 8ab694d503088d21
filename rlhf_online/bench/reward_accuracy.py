"""`rlhf-online bench reward-accuracy`: does the learned reward recover simulated users' hidden preference?

SmolLM2 answers the demo's prompts with sampled replies; on each train prompt a simulated user of a
persona rates two replies (thumbs from its hidden preference — VADER sentiment and
alt-profanity-check — with rating noise) and picks one, as the demo's users do with n=2. The
learned reward trains on those ratings only, and is then scored on every pair of replies of the
held-out prompts against the persona's noise-free hidden preference, with a 95% bootstrap interval
over prompts. The previous default reward (last encoder layer, MLP head) trains on the same
ratings in the same run, as the baseline.

With `--rank-n K` it asks instead whether rankings teach the reward more than preferences do. On
the same replies and prompts, the default reward trains on three arms of comparison-only feedback
(no thumbs: the arms differ in nothing but how the replies were compared), each in its own store,
with the same persona, noise and seed: "preferences (n=2)", the train replies of each prompt in
pairs with one preference per pair; "rankings (n=K)", the replies in groups of K with one ranking
per group (Persona.rank_scores: a noisy insertion sort, each comparison flipped with the rating
noise; training turns a ranking into its C(K, 2) pairs, each weighted 1 / C(K, 2)); and
"preferences, as many events as rankings", the first train_replies / K of those pairs'
preferences per prompt (the same verdicts as in the first arm), so that accuracy per rating event
can be compared. Written to reward_accuracy_rank.json / .md beside the default run's files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_online.bench.common import machine, write_report
from rlhf_online.simulate.users import MAX_RANK_N  # the largest ranking a user can send

if TYPE_CHECKING:
    from rlhf_online.reward.models import RewardModel
    from rlhf_online.simulate.judges import Persona
    from rlhf_online.store import Store

# (name, encoder layer, TrainConfig fields that differ from its defaults): the default, and the
# default before 2026-12-03
VARIANTS = (("default (layer 3, linear head)", 3, {}),
            ("baseline (last layer, MLP 256)", -1, {"head_hidden": 256, "epochs": 300}))


@dataclass(frozen=True)
class Arm:
    """One kind of comparison-only feedback: per train prompt, `events` groups of `size` replies, each compared once."""

    name: str
    size: int  # replies per comparison: 2 (a preference) or K (a ranking)
    events: int  # comparisons per prompt: the first `events` groups of consecutive replies


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the accuracy measurement."""
    p.add_argument("--persona", default="polite")
    p.add_argument("--train-prompts", type=int, default=0, help="0 = all train prompts")
    p.add_argument("--heldout-prompts", type=int, default=0, help="0 = all held-out prompts")
    p.add_argument("--train-replies", type=int, default=None,
                   help="replies rated per train prompt, two per simulated user (even; the demo's n=2); "
                        "default 2, with --rank-n K the least multiple of K and 2")
    p.add_argument("--rank-n", type=int, default=0,
                   help=f"K in 3..{MAX_RANK_N}: compare rankings of K with preferences (comparison-only feedback, "
                        "default reward only) instead of the two reward variants")
    add_generation_arguments(p)


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `cached_replies` reads (shared with bench poisoning), and where the report goes."""
    p.add_argument("--heldout-replies", type=int, default=4,
                   help="replies per held-out prompt; every pair of them is scored")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-generations", action="store_true",
                   help="reuse the replies cached by an earlier run with the same prompts and sampling")
    p.add_argument("--out", default="bench-results")


def generate_replies(args: argparse.Namespace, prompts: list[str], counts: list[int]) -> list[list[str]]:
    """counts[i] sampled replies to prompts[i] from the base policy (engine loop on the main thread)."""
    from rlhf_online.engine.engine import Engine
    from rlhf_online.engine.interface import EngineConfig
    from rlhf_online.engine.request import Limits, SamplingParams
    from rlhf_online.models.provision import load_model, pick_dtype, resolve_base_model

    model, tok = load_model(resolve_base_model(args.base_model, Path(args.data_dir)), dtype=pick_dtype("auto", "cpu"))
    engine = Engine(model, tok, EngineConfig(max_batch_size=32, max_queue=len(prompts) + 1, limits=Limits()))
    out: list[list[str]] = [[] for _ in prompts]

    def submit_all() -> None:
        try:
            handles = [engine.submit(engine.encode_prompt(p), SamplingParams(
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed * 100_000 + 8 * i),
                n=n) for i, (p, n) in enumerate(zip(prompts, counts, strict=True))]
            for i, h in enumerate(handles):
                out[i] = [c.text for c in h.result()]
                if (i + 1) % 50 == 0:
                    print(f"  generated replies for {i + 1}/{len(prompts)} prompts", flush=True)
        finally:
            engine.stop()

    worker = threading.Thread(target=submit_all)
    worker.start()
    engine.run()
    worker.join()
    return out


def cached_replies(args: argparse.Namespace, prompts: list[str], counts: list[int]) -> list[list[str]]:
    """The replies of an earlier run with the same key (with --reuse-generations), else freshly generated."""
    cache = Path(args.out) / "reward_accuracy_generations.json"
    key = {"prompts": prompts, "counts": counts, "max_new_tokens": args.max_new_tokens,
           "temperature": args.temperature, "seed": args.seed, "base_model": args.base_model}
    if args.reuse_generations and cache.exists() and json.loads(cache.read_text())["key"] == key:
        return json.loads(cache.read_text())["replies"]
    replies = generate_replies(args, prompts, counts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "replies": replies}))
    return replies


def bootstrap_interval(per_prompt: list[list[bool]], rng: random.Random, draws: int = 2000) -> tuple[float, float]:
    """95% interval of the pairwise accuracy, resampling prompts (pairs of one prompt are not independent)."""
    stats = []
    for _ in range(draws):
        sample = [x for _ in per_prompt for x in per_prompt[rng.randrange(len(per_prompt))]]
        stats.append(sum(sample) / max(len(sample), 1))
    stats.sort()
    return stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1]


def main(args: argparse.Namespace) -> int:
    """Generate, rate, train on train prompts, measure on held-out prompts; write JSON and Markdown."""
    from rlhf_online.simulate.judges import PERSONAS

    persona = PERSONAS[args.persona]
    if args.train_replies is None:  # the flag's default depends on --rank-n
        args.train_replies = math.lcm(args.rank_n, 2) if args.rank_n else 2
    if args.rank_n:
        return main_rank(args, persona)
    if args.train_replies < 2 or args.train_replies % 2 or args.heldout_replies < 2:
        raise SystemExit("--train-replies must be even and >= 2, --heldout-replies >= 2")
    rng = random.Random(args.seed)
    train, heldout, replies, gen_s = prompts_and_replies(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-accuracy-"))
    store = rated_store(tmp / "store.db", persona, train, replies[: len(train)], rng)
    heldout_replies = replies[len(train):]
    hidden = [persona.preference(texts) for texts in heldout_replies]
    results = []
    for v, variant in enumerate(VARIANTS):
        results.append(measure(variant, tmp / f"reward_models_{v}", store, heldout, heldout_replies, hidden, args.seed))
        print(row(results[-1]), flush=True)
    result = {"benchmark": "reward-accuracy", "persona": persona.name, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "train_prompts": len(train),
              "heldout_prompts": len(heldout), "train_replies": args.train_replies,
              "heldout_replies": args.heldout_replies, "pairwise_accuracy": results[0]["pairwise_accuracy"],
              "ci95": results[0]["ci95"], "baseline_pairwise_accuracy": results[1]["pairwise_accuracy"],
              "variants": results, "feedback": store.count_feedback(), "preferences": store.count_preferences(),
              "generation_seconds": round(gen_s, 1)}
    write_report(args.out, "reward_accuracy", result, table(result, persona))
    return 0


def prompts_and_replies(args: argparse.Namespace) -> tuple[list[str], list[str], list[list[str]], float]:
    """The train and held-out prompts, the replies to both (train first), and the seconds generation took."""
    from rlhf_online.data.prompts import load_prompts

    train = [p.prompt for p in load_prompts("train")][: args.train_prompts or None]
    heldout = [p.prompt for p in load_prompts("heldout")][: args.heldout_prompts or None]
    t0 = time.time()
    print(f"generating {args.train_replies} replies for {len(train)} train and {args.heldout_replies} for "
          f"{len(heldout)} held-out prompts", flush=True)
    replies = cached_replies(args, train + heldout, [args.train_replies] * len(train) + [args.heldout_replies] * len(heldout))
    return train, heldout, replies, time.time() - t0


def main_rank(args: argparse.Namespace, persona: Persona) -> int:
    """--rank-n: the three arms of comparison-only feedback on the same replies; write JSON and Markdown."""
    k = args.rank_n
    check_rank_args(args)
    arms = rank_arms(k, args.train_replies)
    if args.train_prompts:  # before generating, when the number of prompts is known
        check_enough_pairs(arms, args.train_prompts)
    train, heldout, replies, gen_s = prompts_and_replies(args)
    check_enough_pairs(arms, len(train))
    train_replies, heldout_replies = replies[: len(train)], replies[len(train):]
    scores = [persona.preference(texts) for texts in train_replies]
    hidden = [persona.preference(texts) for texts in heldout_replies]
    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-accuracy-rank-"))
    results = []
    for a, arm in enumerate(arms):
        # Each prompt's dice from the seed and the prompt alone, the same in every arm: the two preference
        # arms share their verdicts pair for pair, and no arm's noise hangs on how many draws another made.
        orders = [compare_groups(persona, s, arm.size, arm.events, random.Random(args.seed * 1_000_003 + n))
                  for n, s in enumerate(scores)]
        store = compared_store(tmp / f"store_{a}.db", train, train_replies, orders)
        r = measure(VARIANTS[0], tmp / f"reward_models_{a}", store, heldout, heldout_replies, hidden, args.seed,
                    label=arm.name)
        results.append(arm_result(arm, r, store))
        print(rank_row(results[-1]), flush=True)
    result = {"benchmark": "reward-accuracy-rank", "persona": persona.name, "noise": persona.noise, "rank_n": k,
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "train_prompts": len(train), "heldout_prompts": len(heldout), "train_replies": args.train_replies,
              "heldout_replies": args.heldout_replies, "reward": VARIANTS[0][0], "arms": results,
              "generation_seconds": round(gen_s, 1)}
    write_report(args.out, "reward_accuracy_rank", result, rank_table(result))
    return 0


def rank_arms(k: int, train_replies: int) -> list[Arm]:
    """The three arms of --rank-n K on `train_replies` replies per train prompt."""
    return [Arm("preferences (n=2)", 2, train_replies // 2), Arm(f"rankings (n={k})", k, train_replies // k),
            Arm("preferences, as many events as rankings", 2, train_replies // k)]


def check_rank_args(args: argparse.Namespace) -> None:
    """Reject --rank-n settings the arms cannot be built from, before any reply is generated."""
    k = args.rank_n
    if not 3 <= k <= MAX_RANK_N:
        raise SystemExit(f"--rank-n: invalid value {k} (want 3..{MAX_RANK_N}; 2 would be the preference arm again)")
    if args.train_replies < k or args.train_replies % k or args.train_replies % 2:
        raise SystemExit(f"--train-replies must be a multiple of --rank-n ({k}) and of 2, got {args.train_replies}")
    if args.heldout_replies < 2:
        raise SystemExit("--heldout-replies must be >= 2")


def check_enough_pairs(arms: list[Arm], prompts: int) -> None:
    """Every arm must give the reward training its minimum of examples, else that arm would train nothing."""
    from rlhf_online.reward.training import TrainConfig

    least = TrainConfig().min_train_examples
    arm = min(arms, key=pairs_per_prompt)
    if prompts * pairs_per_prompt(arm) < least:
        raise SystemExit(f"--train-prompts: the arm {arm.name!r} would train on {prompts * pairs_per_prompt(arm)} "
                         f"pairs from {prompts} prompts, fewer than the reward training's minimum of {least} "
                         f"examples; rate at least {math.ceil(least / pairs_per_prompt(arm))} train prompts")


def pairs_per_prompt(arm: Arm) -> int:
    """The training pairs an arm gives per prompt: each comparison of k replies trains as its C(k, 2) pairs."""
    return arm.events * math.comb(arm.size, 2)


def compare_groups(persona: Persona, scores: list[float], size: int, events: int,
                   rng: random.Random) -> list[list[int]]:
    """The persona's order, best first, of each of the first `events` groups of `size` consecutive replies."""
    # Two replies ranked are one prefer_scores call on the same dice: the pairs of both preference arms agree.
    return [[g * size + i for i in persona.rank_scores(scores[g * size:(g + 1) * size], rng)] for g in range(events)]


def compared_store(path: Path, prompts: list[str], replies: list[list[str]], orders: list[list[list[int]]]) -> Store:
    """A SQLite store of the train replies and the comparisons only: a preference per pair, a ranking per larger group."""
    from rlhf_online.store import open_store

    store = open_store(f"sqlite:///{path}")
    for n, (prompt, texts, groups) in enumerate(zip(prompts, replies, orders, strict=True)):
        ids = add_replies(store, n, prompt, texts)
        for g, order in enumerate(groups):
            user = f"user-{n:04d}-{g}"  # one simulated user per comparison, as with n=2 or n=K requests
            if len(order) == 2:
                store.add_preference(ids[order[0]], ids[order[1]], user)
            else:
                store.add_ranking([ids[i] for i in order], user)
    return store


def arm_result(arm: Arm, measured: dict[str, Any], store: Store) -> dict[str, Any]:
    """One arm's figures: its rating events and training pairs beside the accuracy `measure` found."""
    events = store.count_preferences() + store.count_rankings()
    acc = measured["pairwise_accuracy"]
    gain = [100 * (x - 0.5) / events for x in (acc, *measured["ci95"])]
    return {"arm": arm.name, "comparison_size": arm.size, "rating_events": events,
            "preferences": store.count_preferences(), "rankings": store.count_rankings(),
            # No thumbs: every training example is a pair (a ranking's weighing 1 / C(K, 2) each).
            "training_pairs": int(measured["train_metrics"]["train_examples"]),
            "gain_per_100_events": gain[0], "gain_per_100_events_ci95": gain[1:], **measured}


def add_replies(store: Store, n: int, prompt: str, texts: list[str]) -> list[str]:
    """Log train prompt number `n`'s replies as completions; returns their ids."""
    from rlhf_online.store import CompletionRecord

    # Fixed ids: the dataset's order, and so each head's bootstrap resample, is the same every run.
    ids = [f"cmpl-bench-{n:04d}-{k}" for k in range(len(texts))]
    store.add_completions([CompletionRecord(completion_id=i, prompt=prompt, messages=(), text=t, policy_version="")
                           for i, t in zip(ids, texts, strict=True)])
    return ids


def rated_store(path: Path, persona: Persona, prompts: list[str], replies: list[list[str]],
                rng: random.Random) -> Store:
    """A SQLite store of the train replies, each pair rated and compared by a simulated user of `persona`."""
    from rlhf_online.store import open_store

    store = open_store(f"sqlite:///{path}")
    for n, (prompt, texts) in enumerate(zip(prompts, replies, strict=True)):
        ids = add_replies(store, n, prompt, texts)
        for k in range(0, len(texts), 2):  # each simulated user asks for n=2 and rates both, as in the demo
            user = f"user-{rng.randrange(10_000)}"
            for cid, rating in zip(ids[k:k + 2], persona.rate(texts[k:k + 2], rng), strict=True):
                store.add_feedback(cid, user, rating)
            choice = persona.prefer(texts[k], texts[k + 1], rng)
            store.add_preference(ids[k + choice], ids[k + 1 - choice], user)
    return store


def measure(variant: tuple[str, int, dict[str, Any]], registry_dir: Path, store: Store, prompts: list[str],
            replies: list[list[str]], hidden: list[list[float]], seed: int, label: str = "") -> dict[str, Any]:
    """Train one reward variant on the store, then its pairwise accuracy on the held-out replies.

    `label` names the feedback in the error when too little of it trains no model (default: the variant).
    """
    from rlhf_online.reward.encoder import TextEncoder
    from rlhf_online.reward.registry import RewardRegistry
    from rlhf_online.reward.training import TrainConfig, train_and_gate

    name, layer, overrides = variant
    encoder = TextEncoder(layer=layer)
    # Every train prompt trains (training's own held-out slice would take 20% of them away).
    registry = RewardRegistry(registry_dir)
    cfg = TrainConfig(heldout_percent=0, **overrides)
    manifest, _, reason = train_and_gate(registry, store, encoder, cfg)
    if not manifest["version"]:
        raise SystemExit(f"{label or name}: no reward model trained ({reason}); rate more --train-prompts")
    model = registry.load(manifest["version"], encoder)
    per_prompt, clear, ties = judge_pairs(model, prompts, replies, hidden)
    n = sum(len(r) for r in per_prompt)
    acc = sum(sum(r) for r in per_prompt) / n if n else float("nan")
    lo, hi = bootstrap_interval(per_prompt, random.Random(seed))
    return {"reward": name, "encoder_layer": encoder.layer, "head_hidden": cfg.head_hidden,
            "pairwise_accuracy": acc, "ci95": [lo, hi], "heldout_pairs": n, "ties_skipped": ties,
            "clear_pairs": len(clear), "pairwise_accuracy_clear": sum(clear) / len(clear) if clear else float("nan"),
            "reward_model": manifest["version"], "train_metrics": manifest["metrics"]}


def judge_pairs(model: RewardModel, prompts: list[str], replies: list[list[str]],
                hidden: list[list[float]]) -> tuple[list[list[bool]], list[bool], int]:
    """For every pair of replies to each prompt: does the model order it as the hidden preference does?

    Returns the verdicts per prompt, those on clear pairs (hidden scores 0.1 or more apart), and the
    number of tied pairs skipped.
    """
    per_prompt: list[list[bool]] = []
    clear: list[bool] = []
    ties = 0
    for prompt, texts, pref in zip(prompts, replies, hidden, strict=True):
        scores = model.score([prompt] * len(texts), texts)
        right = []
        for a, b in itertools.combinations(range(len(texts)), 2):
            if pref[a] == pref[b]:
                ties += 1
                continue
            ok = (scores[a] > scores[b]) == (pref[a] > pref[b])
            right.append(ok)
            if abs(pref[a] - pref[b]) >= 0.1:
                clear.append(ok)
        per_prompt.append(right)
    return per_prompt, clear, ties


def row(r: dict[str, Any]) -> str:
    """One variant's line of the Markdown table."""
    lo, hi = r["ci95"]
    return (f"| {r['reward']} | {r['pairwise_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {r['heldout_pairs']} | "
            f"{r['pairwise_accuracy_clear']:.3f} ({r['clear_pairs']}) | {r['train_metrics']['train_seconds']:.1f} |")


def rank_row(r: dict[str, Any]) -> str:
    """One arm's line of the --rank-n table."""
    lo, hi = r["ci95"]
    glo, ghi = r["gain_per_100_events_ci95"]
    return (f"| {r['arm']} | {r['rating_events']} | {r['training_pairs']} | {r['pairwise_accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] | {r['pairwise_accuracy_clear']:.3f} ({r['clear_pairs']}) | "
            f"{r['gain_per_100_events']:+.4f} [{glo:+.4f}, {ghi:+.4f}] | {r['train_metrics']['train_seconds']:.1f} |")


def rank_table(result: dict[str, Any]) -> list[str]:
    """The Markdown report of --rank-n."""
    k, arms = result["rank_n"], result["arms"]
    return [f"Rankings (n={k}) vs preferences (n=2), comparison-only feedback — persona {result['persona']!r}, "
            f"{result['machine']}, {result['date']}", "",
            "| feedback | rating events | training pairs | held-out pairwise accuracy [95% CI] | "
            "on pairs with \\|Δ\\| ≥ 0.1 (n) | accuracy − 0.5 per 100 events [95% CI] | train s |",
            "|---|---:|---:|---:|---:|---:|---:|", *map(rank_row, arms), "",
            f"Each arm: the {result['reward']} reward, trained on comparisons only — no thumbs, so the arms differ "
            f"only in preferences vs rankings — of the same {result['train_replies']} replies to each of "
            f"{result['train_prompts']} train prompts, by the same persona (rating noise {result['noise']}) and seed. "
            f"A ranking is a noisy insertion sort (each comparison flipped with the rating noise) and trains as "
            f"its {math.comb(k, 2)} pairs, each weighted 1/{math.comb(k, 2)}; the last arm keeps, of each prompt, "
            f"only the first {result['train_replies'] // k} of the first arm's {result['train_replies'] // 2} "
            "preferences. Scored on every pair of "
            f"{result['heldout_replies']} replies to each of {result['heldout_prompts']} held-out prompts "
            f"({arms[0]['heldout_pairs']} pairs), never seen in training (CI: bootstrap over prompts)."]


def table(result: dict[str, Any], persona: Persona) -> list[str]:
    """The Markdown report."""
    return [f"Learned reward vs simulated users' hidden preference — persona {persona.name!r}, "
            f"{result['machine']}, {result['date']}", "",
            "| reward model | held-out pairwise accuracy [95% CI] | pairs | on pairs with \\|Δ\\| ≥ 0.1 (n) | train s |",
            "|---|---:|---:|---:|---:|", *map(row, result["variants"]), "",
            f"Trained on {result['train_prompts']} train prompts: {result['feedback']} thumbs and "
            f"{result['preferences']} preferences (rating noise {persona.noise}); scored on every pair of "
            f"{result['heldout_replies']} replies to each of {result['heldout_prompts']} held-out prompts, never seen "
            "in training (CI: bootstrap over prompts)."]
