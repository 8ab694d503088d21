"""`rlhf-online bench serving`: concurrent gRPC clients against the server vs sequential model.generate, same run."""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rlhf_online import launch
from rlhf_online.bench.common import machine, wait_until_served, write_report

log = logging.getLogger("rlhf_online.bench")

TOPICS = ["rain", "trains", "coffee", "autumn", "chess", "the sea", "bread", "bicycles",
          "libraries", "owls", "snow", "jazz", "gardens", "bridges", "tea", "mountains"]
PROMPTS = [f"Write a few sentences about {t}." for t in TOPICS]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the serving benchmark."""
    p.add_argument("--clients", type=int, default=16, help="concurrent gRPC clients")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--baseline-requests", type=int, default=8, help="sequential model.generate calls")
    p.add_argument("--base-model", default=os.environ.get("RLHF_BASE_MODEL", "smollm2-135m-instruct"))
    p.add_argument("--data-dir", default=os.environ.get("RLHF_DATA_DIR", "data"))
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--dtype", default=os.environ.get("RLHF_DTYPE", "auto"),
                   help="weights of both the server and the sequential baseline (auto, float32, bfloat16)")
    p.add_argument("--engine", choices=("embedded", "vllm"), default="embedded",
                   help="vllm: serve on vLLM too (run from .venv-vllm) and compare it with the embedded engine, "
                        "each with and without a LoRA adapter, in the same run")
    p.add_argument("--embedded-python", default=os.environ.get("RLHF_EMBEDDED_PYTHON", ""),
                   help="with --engine vllm: the interpreter of the venv that runs the embedded engine (.venv's; "
                        "vLLM's venv has no PEFT)")
    p.add_argument("--out", default="bench-results", help="directory for serving.json and serving.md")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_served(args: argparse.Namespace, model_dir: Path, engine: str = "embedded", adapter: bool = False,
               python: str | None = None) -> dict:
    """Start `rlhf-online serve generation` on `engine` (serving a random LoRA when `adapter`) and drive it."""
    import grpc

    from rlhf_online.v1 import generation_pb2 as pb
    from rlhf_online.v1 import generation_pb2_grpc as pb_grpc

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    env = {"RLHF_BASE_MODEL": str(model_dir), "RLHF_DATA_DIR": str(tmp), "RLHF_STORE_URL": f"sqlite:///{tmp / 'bench.db'}",
           "RLHF_MAX_BATCH_SIZE": str(args.max_batch_size), "RLHF_DTYPE": args.dtype, "RLHF_ENGINE": engine}
    version = _publish_adapter(tmp / "adapters", model_dir) if adapter else ""
    with launch.running("generation", env, tmp, python=python) as service:
        channel = grpc.insecure_channel(service.address)
        stub = pb_grpc.GenerationStub(channel)
        wait_until_served(stub, version, 120, where=f"; see {service.log_path}")
        params = pb.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
        stub.Generate(pb.GenerateRequest(prompt="warm up", params=params), timeout=300)
        tokens, latencies, errors = [], [], []

        def client(i: int) -> None:
            for k in range(args.requests_per_client):
                t = time.perf_counter()
                try:
                    r = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[(i + k) % len(PROMPTS)], params=params),
                                      timeout=600)
                    tokens.append(sum(c.completion_tokens for c in r.completions))
                    latencies.append(time.perf_counter() - t)
                except grpc.RpcError as e:
                    errors.append(str(e.code()))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return {"tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": _percentile(latencies, 0.95),
            "requests": len(latencies), "errors": errors, "engine": engine, "adapter": version}


def _publish_adapter(root: Path, model_dir: Path) -> str:
    """A random rank-16 LoRA on q/k/v/o for the server's base model (its directory), published as CURRENT."""
    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.adapters.synthetic import write_random_lora

    registry = AdapterRegistry(root)
    version = registry.publish(lambda d: write_random_lora(d, model_dir, rank=16), base_model=str(model_dir))
    registry.activate(version)
    return version


def run_sequential(args: argparse.Namespace, model_dir: Path) -> dict:
    """The same kind of requests, one plain `model.generate` call after another."""
    import torch

    from rlhf_online.models.chat import chat_ids
    from rlhf_online.models.provision import load_model, pick_dtype

    # The same dtype as the server, so the ratio measures batching and nothing else.
    model, tok = load_model(model_dir, dtype=pick_dtype(args.dtype, "cpu"))
    n_tok, latencies = 0, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt in PROMPTS[: args.baseline_requests]:
            t = time.perf_counter()
            ids = torch.tensor([chat_ids(tok, [{"role": "user", "content": prompt}])])
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0,
                                 top_p=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            n_tok += out.shape[1] - ids.shape[1]
            latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"tokens": n_tok, "wall_s": wall, "tokens_per_s": n_tok / wall,
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": _percentile(latencies, 0.95),
            "requests": len(latencies)}


def table(result: dict) -> str:
    """The Markdown table of a result."""
    s, q = result["served"], result["sequential"]
    return "\n".join([
        f"Serving benchmark — {result['model']}, {result['clients']} clients x {result['requests_per_client']} requests, "
        f"{result['max_new_tokens']} new tokens, {result['dtype']} on both sides, {result['machine']}, {result['date']}",
        "",
        "| mode | tokens/s | p50 latency (s) | p95 latency (s) | requests |",
        "|---|---:|---:|---:|---:|",
        f"| gRPC server, {result['clients']} concurrent clients | {s['tokens_per_s']:.1f} | {s['latency_p50_s']:.2f} | "
        f"{s['latency_p95_s']:.2f} | {s['requests']} |",
        f"| sequential model.generate | {q['tokens_per_s']:.1f} | {q['latency_p50_s']:.2f} | {q['latency_p95_s']:.2f} | "
        f"{q['requests']} |",
        "",
        f"Throughput ratio (served / sequential): **{result['ratio']:.2f}x**",
        *_engine_rows(result),
    ])


def _engine_rows(result: dict) -> list[str]:
    """With --engine vllm: both engines, with and without an adapter, in the same run."""
    if "engines" not in result:
        return []
    rows = ["", "| engine | adapter | tokens/s | p50 latency (s) | p95 latency (s) | vs sequential |",
            "|---|---|---:|---:|---:|---:|"]
    for r in result["engines"]:
        rows.append(f"| {r['engine']} | {'rank-16 LoRA' if r['adapter'] else 'none'} | {r['tokens_per_s']:.1f} | "
                    f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                    f"{r['tokens_per_s'] / result['sequential']['tokens_per_s']:.2f}x |")
    return rows


def main(args: argparse.Namespace) -> int:
    """Run both modes, write serving.json and serving.md, print the table."""
    from rlhf_online.models.provision import pick_dtype, resolve_base_model

    model_dir = resolve_base_model(args.base_model, Path(args.data_dir))
    engines = []
    if args.engine == "vllm":
        if not args.embedded_python:
            raise SystemExit("bench serving --engine vllm: set --embedded-python to .venv's interpreter "
                             "(make bench-vllm does), the embedded engine needs PEFT for the adapter runs")
        for engine, python in (("embedded", args.embedded_python), ("vllm", None)):
            for adapter in (False, True):
                log.info("bench serving: served phase", extra={"engine": engine, "adapter": adapter})
                engines.append(run_served(args, model_dir, engine, adapter, python))
        served = engines[2]  # vLLM without an adapter
    else:
        log.info("bench serving: served phase", extra={"clients": args.clients})
        served = run_served(args, model_dir)
    log.info("bench serving: sequential phase", extra={"requests": args.baseline_requests})
    sequential = run_sequential(args, model_dir)
    result = {"benchmark": "serving", "model": args.base_model, "machine": machine(),
              "dtype": str(pick_dtype(args.dtype, "cpu")).replace("torch.", ""),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "clients": args.clients,
              "requests_per_client": args.requests_per_client, "max_new_tokens": args.max_new_tokens,
              "served": served, "sequential": sequential,
              "ratio": served["tokens_per_s"] / sequential["tokens_per_s"], **({"engines": engines} if engines else {})}
    write_report(args.out, "serving", result, table(result).splitlines())
    return 1 if any(r["errors"] for r in [served, *engines]) else 0
