"""`rlhf-online bench reward`: items scored per second through the Reward service at batch sizes 1, 16, 64."""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from rlhf_online import launch
from rlhf_online.bench.common import machine, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the reward benchmark."""
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--items", type=int, default=256, help="items scored per batch size (per repeat)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per batch size; the median is reported")
    p.add_argument("--encoder-layer", type=int, default=3, help="the encoder layer pooled (-1 = the last: all 6 computed)")
    p.add_argument("--out", default="bench-results")


def main(args: argparse.Namespace) -> int:
    """Train a learned reward on synthetic feedback, serve it with `serve reward`, time Score at each batch size."""
    import grpc

    from rlhf_online.config import RewardSettings, project
    from rlhf_online.reward.runtime import RewardConfig, RewardRuntime
    from rlhf_online.simulate.synthetic import completion_text, fill_store
    from rlhf_online.store import open_store
    from rlhf_online.v1 import reward_pb2 as pb
    from rlhf_online.v1 import reward_pb2_grpc as pb_grpc

    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    env = {"RLHF_DATA_DIR": str(tmp), "RLHF_STORE_URL": f"sqlite:///{tmp / 'store.db'}",
           "RLHF_RETRAIN_INTERVAL_SECONDS": "3600", "RLHF_ENCODER_LAYER": str(args.encoder_layer)}
    settings = RewardSettings(data_dir=tmp, store_url=env["RLHF_STORE_URL"], encoder_layer=args.encoder_layer)
    runtime = RewardRuntime(project(RewardConfig, settings), open_store(env["RLHF_STORE_URL"]))
    fill_store(runtime.store)
    _, promoted, reason = runtime.train()
    assert promoted, reason  # the benchmark must time a real trained head, not the untrained zeros
    version = runtime.info()[0]
    with launch.running("reward", env, tmp) as service:
        stub = pb_grpc.RewardStub(grpc.insecure_channel(service.address))
        rng = random.Random(0)

        def fresh_items(tag: str) -> list[pb.ScoreItem]:
            # Texts never scored before: the service caches embeddings, and a repeat must not time the cache.
            return [pb.ScoreItem(prompt=f"Write a reply about case {tag}-{i}.",
                                 completion=f"{completion_text(rng)[0]} (ref {tag}-{i})") for i in range(args.items)]

        assert stub.Score(pb.ScoreRequest(items=fresh_items("warmup")[:8]), timeout=60).reward_model_version == version
        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            rates = []
            for rep in range(args.repeats):
                items = fresh_items(f"{bs}-{rep}")
                t0 = time.perf_counter()
                for i in range(0, len(items), bs):
                    stub.Score(pb.ScoreRequest(items=items[i:i + bs]), timeout=120)
                rates.append(len(items) / (time.perf_counter() - t0))
            rows.append({"batch_size": bs, "items_per_s": statistics.median(rates), "repeats": rates})
    base = rows[0]["items_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["items_per_s"] / base
    result = {"benchmark": "reward", "reward_model": version, "encoder_layer": args.encoder_layer, "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "items": args.items, "rows": rows}
    lines = [f"Reward benchmark — learned reward (all-MiniLM-L6-v2 layer {args.encoder_layer} + head), Score over gRPC, {args.items} items, "
             f"median of {args.repeats}, {result['machine']}, {result['date']}", "",
             "| batch size | items/s | vs batch 1 |", "|---:|---:|---:|"]
    lines += [f"| {r['batch_size']} | {r['items_per_s']:.1f} | {r['speedup_vs_first']:.2f}x |" for r in rows]
    write_report(args.out, "reward", result, lines)
    return 0
