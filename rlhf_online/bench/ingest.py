"""`rlhf-online bench ingest`: thumbs ratings per second through the gRPC API into the durable store.

Starts `rlhf-online serve generation` on its default embedded store (SQLite, WAL, synchronous=FULL:
a rating is acknowledged only once it is on disk) or on `--store-url`, asks it for `--completions`
one-token replies to rate, then `--clients` threads each send `--ratings-per-client`
SubmitFeedback calls (every one a new (completion, user) pair), as fast as they are answered.
In the same run, the same clients call GetPolicy, which touches no store: the RPC ceiling of the
setup. After the service stopped, the store is opened again and every acknowledged rating must
be in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rlhf_online import launch
from rlhf_online.bench.common import machine, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the ingest benchmark."""
    p.add_argument("--clients", type=int, default=16, help="concurrent gRPC clients")
    p.add_argument("--ratings-per-client", type=int, default=1000)
    p.add_argument("--completions", type=int, default=64, help="replies generated first, to be rated")
    p.add_argument("--store-url", default="", help="default: a fresh SQLite file (the embedded default store)")
    p.add_argument("--base-model", default=os.environ.get("RLHF_BASE_MODEL", "smollm2-135m-instruct"))
    p.add_argument("--data-dir", default=os.environ.get("RLHF_DATA_DIR", "data"))
    p.add_argument("--out", default="bench-results", help="directory for ingest.json and ingest.md")


def _hammer(clients: int, per_client: int, call: Any) -> dict[str, Any]:
    """`clients` threads each making `per_client` calls `call(client, k)`; rate, latency, errors."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        start.wait()
        for k in range(per_client):
            t = time.perf_counter()
            try:
                call(i, k)
            except Exception as e:  # counted and reported; the benchmark fails on any
                errors.append(f"{type(e).__name__}: {getattr(e, 'code', lambda: '')()}")
                continue
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = sorted(x for xs in latencies for x in xs)
    return {"calls": len(flat), "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            "per_s": len(flat) / wall, "latency_p50_ms": 1000 * statistics.median(flat) if flat else float("nan"),
            "latency_p99_ms": 1000 * flat[min(len(flat) - 1, int(0.99 * len(flat)))] if flat else float("nan")}


def main(args: argparse.Namespace) -> int:
    """Run both phases against one service, check the store, write ingest.json / ingest.md."""
    import grpc

    from rlhf_online.models.provision import resolve_base_model
    from rlhf_online.store import open_store
    from rlhf_online.v1 import generation_pb2 as pb
    from rlhf_online.v1 import generation_pb2_grpc as pb_grpc

    model = resolve_base_model(args.base_model, Path(args.data_dir))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    store_url = args.store_url or f"sqlite:///{tmp / 'ingest.db'}"
    env = {"RLHF_BASE_MODEL": str(model), "RLHF_DATA_DIR": str(tmp), "RLHF_STORE_URL": store_url,
           "RLHF_FEEDBACK_RATE_PER_USER": "0"}
    with launch.running("generation", env, tmp) as service:
        channel = grpc.insecure_channel(service.address)
        stub = pb_grpc.GenerationStub(channel)
        params = pb.SamplingParams(max_new_tokens=1, temperature=1.0)
        ids: list[str] = []
        while len(ids) < args.completions:
            reply = stub.Generate(pb.GenerateRequest(prompt=f"Say something about the number {len(ids)}.",
                                                     params=params, n=8), timeout=300)
            ids += [c.completion_id for c in reply.completions]
        print(f"{len(ids)} completions to rate; {args.clients} clients x {args.ratings_per_client} ...", flush=True)
        acknowledged: set[tuple[str, str]] = set()
        lock = threading.Lock()

        def rate(i: int, k: int) -> None:
            cid, user = ids[k % len(ids)], f"bench-{i}-{k // len(ids)}"
            rating = pb.RATING_THUMBS_UP if (i + k) % 2 else pb.RATING_THUMBS_DOWN
            stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=cid, rating=rating, user_id=user), timeout=60)
            with lock:
                acknowledged.add((cid, user))

        ceiling = _hammer(args.clients, args.ratings_per_client, lambda i, k: stub.GetPolicy(pb.GetPolicyRequest(),
                                                                                            timeout=60))
        ingest = _hammer(args.clients, args.ratings_per_client, rate)
        channel.close()
    store = open_store(store_url)
    try:
        stored = {(f.completion_id, f.user_id) for f in store.list_feedback()}
    finally:
        store.close()
    lost = len(acknowledged - stored)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "store": "sqlite (WAL, synchronous=FULL)" if not args.store_url else "postgresql",
              "clients": args.clients, "ratings_per_client": args.ratings_per_client,
              "get_policy": ceiling, "ingest": ingest, "acknowledged": len(acknowledged), "stored": len(stored),
              "acknowledged_but_lost": lost, "ratio_to_rpc_ceiling": ingest["per_s"] / ceiling["per_s"]}
    lines = [f"# Feedback ingest ({result['machine']}, {result['date']}, {result['store']})", "",
             "| calls | per second | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
    for name, r in (("GetPolicy (no store: the RPC ceiling)", ceiling), ("SubmitFeedback", ingest)):
        lines.append(f"| {name} | {r['per_s']:.0f} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
                     f"{r['errors']} |")
    lines += ["", f"{len(acknowledged)} ratings acknowledged, {len(stored)} in the store afterwards, "
                  f"{lost} acknowledged but missing; ingest at {result['ratio_to_rpc_ceiling']:.2f} of the RPC ceiling."]
    write_report(args.out, "ingest", result, lines)
    return 0 if ingest["errors"] == 0 and lost == 0 else 1
