"""`rlhf-online bench reward-accuracy`: does the learned reward recover simulated users' hidden preference?

SmolLM2 answers the demo's prompts (two sampled replies each); a persona rates them from its hidden
preference (VADER sentiment and alt-profanity-check, with rating noise) through thumbs and a
pairwise choice; the learned reward model trains on the train prompts' ratings only. It is then
scored on the held-out prompts' reply pairs against the persona's noise-free hidden preference.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

from rlhf_online.bench.common import machine, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the accuracy measurement."""
    p.add_argument("--persona", default="polite")
    p.add_argument("--train-prompts", type=int, default=0, help="0 = all train prompts")
    p.add_argument("--heldout-prompts", type=int, default=0, help="0 = all held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-generations", action="store_true",
                   help="reuse the replies cached by an earlier run with the same prompts and sampling")
    p.add_argument("--out", default="bench-results")


def generate_pairs(args: argparse.Namespace, prompts: list[str]) -> list[tuple[str, str]]:
    """Two sampled replies per prompt from the base policy (engine loop on the main thread)."""
    from rlhf_online.engine.engine import Engine, EngineConfig
    from rlhf_online.engine.request import Limits, SamplingParams
    from rlhf_online.models.provision import load_model, resolve_base_model
    from services.bootstrap import pick_dtype

    model, tok = load_model(resolve_base_model(args.base_model, Path(args.data_dir)), dtype=pick_dtype("auto", "cpu"))
    engine = Engine(model, tok, EngineConfig(max_batch_size=32, max_queue=len(prompts) + 1, limits=Limits()))
    out: list[tuple[str, str]] = [("", "")] * len(prompts)

    def submit_all() -> None:
        try:
            handles = [engine.submit(engine.encode_prompt(p), SamplingParams(
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed * 100_000 + 2 * i),
                n=2) for i, p in enumerate(prompts)]
            for i, h in enumerate(handles):
                a, b = h.result()
                out[i] = (a.text, b.text)
                if (i + 1) % 50 == 0:
                    print(f"  generated {i + 1}/{len(prompts)}", flush=True)
        finally:
            engine.stop()

    worker = threading.Thread(target=submit_all)
    worker.start()
    engine.run()
    worker.join()
    return out


def main(args: argparse.Namespace) -> int:
    """Generate, rate, train on train prompts, measure on held-out prompts; write JSON and Markdown."""
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.reward.encoder import TextEncoder
    from rlhf_online.reward.registry import RewardRegistry
    from rlhf_online.reward.training import TrainConfig
    from rlhf_online.simulate.judges import PERSONAS
    from rlhf_online.store import CompletionRecord, open_store

    persona = PERSONAS[args.persona]
    rng = random.Random(args.seed)
    train = [p.prompt for p in load_prompts("train")][: args.train_prompts or None]
    heldout = [p.prompt for p in load_prompts("heldout")][: args.heldout_prompts or None]
    t0 = time.time()
    print(f"generating 2 replies for {len(train)} train + {len(heldout)} held-out prompts", flush=True)
    cache = Path(args.out) / "reward_accuracy_generations.json"
    key = {"prompts": train + heldout, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
           "seed": args.seed, "base_model": args.base_model}
    if args.reuse_generations and cache.exists() and json.loads(cache.read_text())["key"] == key:
        pairs = [tuple(p) for p in json.loads(cache.read_text())["pairs"]]  # same prompts and sampling: reuse
    else:
        pairs = generate_pairs(args, train + heldout)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "pairs": pairs}))
    gen_s = time.time() - t0
    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-accuracy-"))
    store = open_store(f"sqlite:///{tmp / 'store.db'}")
    for prompt, (a, b) in zip(train, pairs[: len(train)], strict=True):
        ids = [f"cmpl-{uuid.uuid4().hex}" for _ in range(2)]
        store.add_completions([CompletionRecord(completion_id=i, prompt=prompt, messages=(), text=t, policy_version="")
                               for i, t in zip(ids, (a, b), strict=True)])
        user = f"user-{rng.randrange(10_000)}"
        for cid, rating in zip(ids, persona.rate([a, b], rng), strict=True):
            store.add_feedback(cid, user, rating)
        choice = persona.prefer(a, b, rng)
        store.add_preference(ids[choice], ids[1 - choice], user)
    encoder = TextEncoder()
    # Every train prompt trains (the registry's own held-out slice would take 20% of them away).
    registry = RewardRegistry(tmp / "reward_models")
    manifest, _, _ = registry.train_and_gate(store, encoder, TrainConfig(heldout_percent=0))
    model = registry.load(manifest["version"], encoder)
    hold_pairs = pairs[len(train):]
    right, right_clear, clear, ties = 0, 0, 0, 0
    for prompt, (a, b) in zip(heldout, hold_pairs, strict=True):
        pa, pb = persona.preference([a, b])
        if pa == pb:
            ties += 1
            continue
        ra, rb = model.score([prompt, prompt], [a, b])
        ok = (ra > rb) == (pa > pb)
        right += ok
        if abs(pa - pb) >= 0.1:
            clear += 1
            right_clear += ok
    n = len(hold_pairs) - ties
    result = {"benchmark": "reward-accuracy", "persona": persona.name, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "train_prompts": len(train),
              "heldout_prompts": len(heldout), "heldout_pairs": n, "ties_skipped": ties,
              "pairwise_accuracy": right / n if n else float("nan"),
              "clear_pairs": clear, "pairwise_accuracy_clear": right_clear / clear if clear else float("nan"),
              "feedback": store.count_feedback(), "preferences": len(store.list_preferences()),
              "generation_seconds": round(gen_s, 1), "reward_model": manifest["version"],
              "train_metrics": manifest["metrics"]}
    lines = [f"Learned reward vs simulated users' hidden preference — persona {persona.name!r}, "
             f"{result['machine']}, {result['date']}", "",
             "| held-out pairs | pairwise accuracy | pairs with clear preference (|Δ| ≥ 0.1) | accuracy on those |",
             "|---:|---:|---:|---:|",
             f"| {n} | {result['pairwise_accuracy']:.3f} | {clear} | {result['pairwise_accuracy_clear']:.3f} |", "",
             f"Trained on {len(train)} train prompts: {result['feedback']} thumbs and {result['preferences']} "
             f"preferences (rating noise {persona.noise}); held-out prompts never seen in training."]
    write_report(args.out, "reward_accuracy", result, lines)
    return 0
