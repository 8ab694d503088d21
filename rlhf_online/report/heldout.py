"""Held-out evaluation of policies by the judges: same prompts, same sampling seeds, every policy in one batch.

Each policy answers every held-out prompt `samples` times; sample k of prompt i uses the same seed
under every policy, so differences come from the policies, not from the dice. The judges
(VADER, alt-profanity-check) and the personas' noise-free ratings score the replies; the learned
reward model plays no part here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_online.simulate import judges


@dataclass(frozen=True)
class HeldoutConfig:
    """How the held-out replies are sampled (the same as the simulated users ask, by default)."""

    samples: int = 2  # replies per prompt and policy
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 20261124
    max_batch_size: int = 64  # rows decoded together: 64 gave 1.16x the tokens/s of 32 here (bf16, 2 threads)


@dataclass
class Judged:
    """Per-reply judge scores of one policy, in prompt-major order."""

    texts: list[str]
    toxicity: list[float]
    sentiment: list[float]
    thumbs_up: list[float]  # 1.0 where the personas' noise-free preference says thumbs up (averaged over personas)


def generate(model_path: Path, adapters: dict[str, Path | None], prompts: Sequence[str], cfg: HeldoutConfig,
             dtype: str = "auto", progress: bool = True) -> dict[str, list[str]]:
    """Replies of each policy (label -> adapter dir, None = bare base) to every prompt, `cfg.samples` each."""
    from rlhf_online.engine.engine import Engine
    from rlhf_online.engine.interface import EngineConfig
    from rlhf_online.engine.request import Limits, SamplingParams
    from rlhf_online.models.provision import load_model, pick_dtype

    model, tok = load_model(model_path, dtype=pick_dtype(dtype, "cpu"))
    jobs = [(label, i, k) for label in adapters for i in range(len(prompts)) for k in range(cfg.samples)]
    engine = Engine(model, tok, EngineConfig(max_batch_size=cfg.max_batch_size, max_queue=len(jobs) + 1,
                                             limits=Limits()))
    out: dict[str, list[str]] = {label: [""] * (len(prompts) * cfg.samples) for label in adapters}
    errors: list[BaseException] = []

    def submit_all() -> None:
        # Runs beside engine.run(), which keeps the main thread (torch is fastest there).
        try:
            handles = []
            for label, path in adapters.items():
                if path is not None:
                    engine.load_adapter(label, path)
                engine.set_current(label if path is not None else "")
                for i, p in enumerate(prompts):
                    ids = engine.encode_prompt(p)
                    for k in range(cfg.samples):
                        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                top_p=cfg.top_p, seed=cfg.seed + 1000 * i + k)
                        handles.append((label, i * cfg.samples + k, engine.submit(ids, params)))
            for done, (label, slot, h) in enumerate(handles, 1):
                out[label][slot] = h.result()[0].text
                if progress and done % 100 == 0:
                    print(f"  held-out replies {done}/{len(handles)}", flush=True)
        except BaseException as e:  # surfaced on the main thread below
            errors.append(e)
        finally:
            engine.stop()

    worker = threading.Thread(target=submit_all, name="heldout-submit")
    worker.start()
    engine.run()
    worker.join()
    if errors:
        raise RuntimeError(f"held-out generation failed: {errors[0]}") from errors[0]
    return out


CACHE_FORMAT = 1  # bump when what a cached reply means changes


def base_cache_key(model_path: Path, prompts: Sequence[str], cfg: HeldoutConfig, dtype: str) -> str:
    """What the base's held-out replies depend on: the model's files, the prompts, the sampling settings."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_path).iterdir() if f.is_file())
    blob = json.dumps({"format": CACHE_FORMAT, "files": files, "prompts": list(prompts),
                       "config": dataclasses.asdict(cfg), "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_base_replies(cache_dir: Path, key: str, count: int) -> list[str] | None:
    """The bare base's replies stored under `key` by an earlier run, or None.

    The base and its seeds are the same in every run, so its replies are too (up to bf16 rounding in
    a batch of another composition): judging them again would be the same few minutes each time.
    """
    try:
        data = json.loads(_cache_path(cache_dir, key).read_text())
    except (OSError, ValueError):
        return None
    texts = data.get("texts")
    if data.get("key") != key or not isinstance(texts, list) or len(texts) != count:
        return None
    return [str(t) for t in texts]


def store_base_replies(cache_dir: Path, key: str, texts: list[str]) -> None:
    """Keep the bare base's replies for the next run (written atomically)."""
    from rlhf_online.artifacts import write_json_atomically

    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(_cache_path(cache_dir, key), {"key": key, "texts": texts})


def _cache_path(cache_dir: Path, key: str) -> Path:
    """Where the base's replies under `key` are kept (the full key is checked inside the file)."""
    return cache_dir / f"base-{key[:16]}.json"


def judge(texts: list[str], personas: Sequence[str]) -> Judged:
    """Toxicity, sentiment and the personas' noise-free thumbs of each reply."""
    tox, sent = judges.toxicity(texts), judges.sentiment(texts)
    ups = [0.0] * len(texts)
    for name in personas:
        p = judges.PERSONAS[name]
        for j, (s, t) in enumerate(zip(sent, tox, strict=True)):
            ups[j] += (p.w_sentiment * s - p.w_toxicity * t > p.threshold) / len(personas)
    return Judged(texts, tox, sent, ups)


def bootstrap_ci(values: Sequence[float], iters: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap confidence interval."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo = means[int((1 - level) / 2 * iters)]
    hi = means[min(iters - 1, int((1 + level) / 2 * iters))]
    return sum(values) / n, lo, hi


def summarize(j: Judged, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and 95% bootstrap CI of each judge score."""
    out = {}
    for name, values in (("toxicity", j.toxicity), ("sentiment", j.sentiment), ("thumbs_up_rate", j.thumbs_up)):
        mean, lo, hi = bootstrap_ci(values, seed=seed)
        out[name] = {"mean": mean, "ci95": [lo, hi]}
    return out
