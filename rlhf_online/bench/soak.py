"""`rlhf-online bench soak`: minutes of steady Generate + SubmitFeedback load with an adapter swap every minute.

The generation service runs as its own process (`rlhf-online serve generation`) watching an adapter
registry; this benchmark publishes and activates a new LoRA version every `--swap-every` seconds
while clients send requests at a fixed rate, each answered completion followed by a rating. It
counts every failed RPC, samples the server's resident memory, checks after the server's graceful
exit that every acknowledged rating is in the store, and passes only with zero failures, no lost
feedback, and RSS growth within `--rss-growth-limit-mb`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rlhf_online.bench.common import free_port, machine, write_report

log = logging.getLogger("rlhf_online.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the soak benchmark."""
    p.add_argument("--seconds", type=float, default=300.0, help="duration of the steady load")
    p.add_argument("--rate", type=float, default=2.0, help="Generate requests per second (each followed by feedback)")
    p.add_argument("--clients", type=int, default=8, help="client threads sharing the rate")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--swap-every", type=float, default=60.0, help="publish and activate a new adapter this often (s)")
    p.add_argument("--adapter-poll-seconds", type=float, default=2.0, help="the server's registry poll interval")
    p.add_argument("--rss-growth-limit-mb", type=float, default=100.0,
                   help="fail when the server's RSS at the end exceeds its RSS after the ramp-up by more than this")
    p.add_argument("--base-model", default=os.environ.get("RLHF_BASE_MODEL", "smollm2-135m-instruct"),
                   help="built-in model name or a local Hugging Face directory")
    p.add_argument("--data-dir", default=os.environ.get("RLHF_DATA_DIR", "data"))
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--dtype", default=os.environ.get("RLHF_DTYPE", "auto"), help="auto, float32 or bfloat16")
    p.add_argument("--torch-threads", type=int, default=int(os.environ.get("RLHF_TORCH_THREADS", "0") or 0),
                   help="the server's torch threads (0 = all cores; on a shared machine fewer avoid oversubscription)")
    p.add_argument("--out", default="bench-results", help="directory for soak.json and soak.md")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def make_adapters(model_dir: Path, out: Path, count: int = 3) -> list[Path]:
    """`count` distinct small LoRAs (r=8 on q/k/v/o) of the base model, saved as PEFT directories."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf_online.models.provision import load_model

    model, _ = load_model(model_dir)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    dirs = []
    for k in range(count):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:  # zero at init (= the base): a small nudge makes each version distinct
                    param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
        peft.save_pretrained(out / f"lora{k}")
        dirs.append(out / f"lora{k}")
    del peft, model
    return dirs


class Server:
    """`rlhf-online serve generation` as a subprocess whose pid is known (for RSS sampling)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.port = free_port()
        env = {**os.environ, **env, "RLHF_PORT": str(self.port), "RLHF_METRICS_PORT": "0", "RLHF_HOST": "127.0.0.1"}
        with open(log_path, "w") as server_log:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "generation"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=server_log)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the generation service did not start; see {log_path}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain); killed after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run(args: argparse.Namespace, model_dir: Path, tmp: Path) -> dict[str, Any]:
    """Start the server, drive it, swap adapters, sample memory; return the figures."""
    import grpc

    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.data.prompts import load_prompts
    from rlhf_online.v1 import generation_pb2 as pb
    from rlhf_online.v1 import generation_pb2_grpc as pb_grpc

    registry = AdapterRegistry(tmp / "adapters")
    sources = make_adapters(model_dir, tmp / "sources")
    prompts = [p.prompt for p in load_prompts("train")]
    env = {"RLHF_BASE_MODEL": args.base_model, "RLHF_DATA_DIR": str(Path(args.data_dir).resolve()),
           "RLHF_STORE_URL": f"sqlite:///{tmp / 'soak.db'}", "RLHF_ADAPTER_DIR": str(registry.root),
           "RLHF_ADAPTER_POLL_SECONDS": str(args.adapter_poll_seconds), "RLHF_MAX_BATCH_SIZE": str(args.max_batch_size),
           "RLHF_DTYPE": args.dtype, "RLHF_MAX_NEW_TOKENS": str(max(args.max_new_tokens, 512)),
           "RLHF_GRACE_SECONDS": "60", "RLHF_TORCH_THREADS": str(args.torch_threads)}
    server = Server(env, tmp / "generation.log")
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    params = pb.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95)
    swaps: list[dict[str, Any]] = []

    def swap() -> None:
        """Publish the next version, activate it, and time how long until the server says it serves it."""
        import shutil

        src = sources[len(swaps) % len(sources)]
        t0 = time.monotonic()
        version = registry.publish(lambda d: [shutil.copy(p, d / p.name) for p in src.iterdir()],
                                   base_model=args.base_model, parent=registry.current())
        registry.activate(version)
        registry.prune(keep=3)
        record = {"version": version, "at_s": round(t0 - load_start, 1) if load_start else 0.0, "took_s": None}
        swaps.append(record)
        end = time.monotonic() + 4 * args.adapter_poll_seconds + 60
        while time.monotonic() < end:
            try:
                if stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).version == version:
                    record["took_s"] = round(time.monotonic() - t0, 2)
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)

    load_start = 0.0
    try:
        # Warm up (first-call allocations are not growth) on the first adapter version.
        swap()
        for i in range(4):
            stub.Generate(pb.GenerateRequest(prompt=prompts[i], params=params), timeout=300)
        lock = threading.Lock()
        latencies: list[float] = []
        failures: dict[str, int] = {}
        counts = {"generate_ok": 0, "generate_failed": 0, "feedback_ok": 0, "feedback_failed": 0, "duplicates": 0}
        acked: list[tuple[str, str]] = []
        lateness: list[float] = []
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        load_start = time.monotonic()
        period = args.clients / args.rate  # each client's interval between requests

        def fail(kind: str, e: grpc.RpcError) -> None:
            with lock:
                counts[f"{kind}_failed"] += 1
                key = f"{kind}: {e.code().name}"
                failures[key] = failures.get(key, 0) + 1
            log.error("soak request failed", extra={"rpc": kind, "code": e.code().name, "details": e.details()})

        def client(w: int) -> None:
            rng = random.Random(w)
            n = 0
            while True:
                due = load_start + (w / args.clients + n) * period
                # The load stops on time: a server that fell behind is not given extra minutes to catch up.
                if due >= load_start + args.seconds or time.monotonic() >= load_start + args.seconds:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with lock:
                    lateness.append(max(0.0, -wait))
                n += 1
                t = time.monotonic()
                try:
                    r = stub.Generate(pb.GenerateRequest(prompt=rng.choice(prompts), params=params,
                                                         user_id=f"soak-{w}"), timeout=120)
                except grpc.RpcError as e:
                    fail("generate", e)
                    continue
                with lock:
                    counts["generate_ok"] += 1
                    latencies.append(time.monotonic() - t)
                cid, user = r.completions[0].completion_id, f"soak-{w}"
                rating = rng.choice([pb.RATING_THUMBS_UP, pb.RATING_THUMBS_DOWN])
                try:
                    dup = stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=cid, rating=rating,
                                                                       user_id=user), timeout=30).duplicate
                except grpc.RpcError as e:
                    fail("feedback", e)
                    continue
                with lock:
                    counts["feedback_ok"] += 1
                    counts["duplicates"] += int(dup)
                    acked.append((cid, user))

        def sample_rss() -> None:
            while not stop.is_set():
                rss.append((round(time.monotonic() - load_start, 1), rss_mb(server.proc.pid)))
                stop.wait(2.0)

        def swapper() -> None:
            k = 1
            while not stop.wait(max(0.0, load_start + k * args.swap_every - time.monotonic())):
                if time.monotonic() - load_start >= args.seconds:
                    return
                swap()
                k += 1

        threads = [threading.Thread(target=client, args=(w,), name=f"client-{w}") for w in range(args.clients)]
        helpers = [threading.Thread(target=sample_rss, name="rss"), threading.Thread(target=swapper, name="swapper")]
        for t in [*threads, *helpers]:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - load_start
        rss.append((round(wall, 1), rss_mb(server.proc.pid)))
        stop.set()
        for t in helpers:
            t.join()
    finally:
        exit_code = server.stop()

    from rlhf_online.store import open_store

    with open_store(f"sqlite:///{tmp / 'soak.db'}") as store:
        recorded = {(f.completion_id, f.user_id) for f in store.list_feedback()}
    lost = len(set(acked) - recorded)
    values = [m for _, m in rss]
    start_mb, peak_mb, end_mb = values[0], max(values), values[-1]
    # Memory rises while the batch first fills to the load's steady concurrency (KV caches, allocator
    # pools); growth is judged from the end of that ramp (the first swap, or a quarter of the run).
    ramp = min(args.swap_every, args.seconds / 4)
    steady_mb = next((m for t, m in rss if t >= ramp), start_mb)
    return {"seconds": round(wall, 1), **counts, "failures_by_code": failures, "feedback_lost": lost,
            "latency_p50_s": round(_percentile(latencies, 0.5), 3), "latency_p95_s": round(_percentile(latencies, 0.95), 3),
            "latency_max_s": round(max(latencies, default=float("nan")), 3),
            "achieved_rate_per_s": round(counts["generate_ok"] / wall, 2),
            "scheduled": int(args.seconds * args.rate), "sent": len(lateness),
            "schedule_lateness_p95_s": round(_percentile(lateness, 0.95), 3),
            "swaps": swaps, "swaps_ok": sum(1 for s in swaps if s["took_s"] is not None),
            "rss_start_mb": round(start_mb, 1), "rss_peak_mb": round(peak_mb, 1), "rss_end_mb": round(end_mb, 1),
            "rss_steady_start_mb": round(steady_mb, 1), "rss_steady_start_at_s": ramp,
            "rss_growth_mb": round(end_mb - steady_mb, 1), "rss_samples": rss, "server_exit_code": exit_code}


def table(result: dict) -> list[str]:
    """The Markdown report."""
    r = result["run"]
    swap_times = [s["took_s"] for s in r["swaps"] if s["took_s"] is not None]
    verdict = "PASS" if result["passed"] else "FAIL"
    return [
        f"Soak benchmark — {result['model']}, {r['seconds']:.0f} s at {result['rate']} req/s "
        f"({result['clients']} clients, {result['max_new_tokens']} new tokens, server torch threads "
        f"{result['torch_threads'] or 'all'}), a swap every {result['swap_every']:.0f} s, "
        f"{result['machine']}, {result['date']}: **{verdict}**",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| Generate ok / failed | {r['generate_ok']} / {r['generate_failed']} |",
        f"| SubmitFeedback ok / failed | {r['feedback_ok']} / {r['feedback_failed']} |",
        f"| acknowledged feedback missing from the store | {r['feedback_lost']} |",
        f"| requests scheduled / sent (a slow server delays the clients) | {r['scheduled']} / {r['sent']} |",
        f"| achieved rate (req/s) | {r['achieved_rate_per_s']} |",
        f"| latency p50 / p95 / max (s) | {r['latency_p50_s']} / {r['latency_p95_s']} / {r['latency_max_s']} |",
        f"| adapter swaps served / published | {r['swaps_ok']} / {len(r['swaps'])} |",
        f"| swap: activate → served (s), each | {', '.join(f'{t:.2f}' for t in swap_times) or '-'} |",
        f"| server RSS at load start / after ramp-up ({r['rss_steady_start_at_s']:.0f} s) / peak / end (MiB) | "
        f"{r['rss_start_mb']} / {r['rss_steady_start_mb']} / {r['rss_peak_mb']} / {r['rss_end_mb']} |",
        f"| RSS growth from ramp-up to end (MiB), bound | {r['rss_growth_mb']}, ≤ {result['rss_growth_limit_mb']} |",
        f"| server exit code after SIGTERM | {r['server_exit_code']} |",
        "",
        f"Failures by code: {r['failures_by_code'] or 'none'}",
    ]


def main(args: argparse.Namespace) -> int:
    """Run the soak, write soak.json and soak.md, print the table; 0 only if it passed."""
    from rlhf_online.models.provision import pick_dtype, resolve_base_model

    model_dir = resolve_base_model(args.base_model, Path(args.data_dir))
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    log.info("bench soak", extra={"seconds": args.seconds, "rate": args.rate, "tmp": str(tmp)})
    r = run(args, model_dir, tmp)
    passed = (r["generate_failed"] == 0 and r["feedback_failed"] == 0 and r["feedback_lost"] == 0
              and r["sent"] >= 0.9 * r["scheduled"]  # the steady rate was held
              and r["swaps_ok"] == len(r["swaps"]) and r["rss_growth_mb"] <= args.rss_growth_limit_mb
              and r["server_exit_code"] == 0)
    result = {"benchmark": "soak", "model": args.base_model, "machine": machine(),
              "dtype": str(pick_dtype(args.dtype, "cpu")).replace("torch.", ""),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rate": args.rate,
              "clients": args.clients, "max_new_tokens": args.max_new_tokens, "swap_every": args.swap_every,
              "torch_threads": args.torch_threads,
              "rss_growth_limit_mb": args.rss_growth_limit_mb, "passed": passed, "run": r, "work_dir": str(tmp)}
    write_report(args.out, "soak", result, table(result))
    return 0 if passed else 1
