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
import contextlib
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from rlhf_online import launch
from rlhf_online.bench.common import machine, write_report
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("rlhf_online.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the soak benchmark."""
    p.add_argument("--seconds", type=float, default=300.0, help="duration of the steady load")
    p.add_argument("--rate", type=float, default=2.0, help="Generate requests per second (each followed by feedback)")
    p.add_argument("--clients", type=int, default=8, help="client threads sharing the rate")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--swap-every", type=float, default=60.0, help="publish and activate a new adapter this often (s)")
    p.add_argument("--adapter-poll-seconds", type=float, default=2.0, help="the server's registry poll interval")
    p.add_argument("--adapter-notice-seconds", type=float, default=0.05,
                   help="the server's stat interval for a replaced CURRENT (0 = only the poll)")
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


def server_env(args: argparse.Namespace, adapter_dir: Path, store_url: str) -> dict[str, str]:
    """RLHF_* settings of the generation service under soak."""
    return {"RLHF_BASE_MODEL": args.base_model, "RLHF_DATA_DIR": str(Path(args.data_dir).resolve()),
            "RLHF_STORE_URL": store_url, "RLHF_ADAPTER_DIR": str(adapter_dir),
            "RLHF_ADAPTER_POLL_SECONDS": str(args.adapter_poll_seconds),
            "RLHF_ADAPTER_NOTICE_SECONDS": str(args.adapter_notice_seconds), "RLHF_MAX_BATCH_SIZE": str(args.max_batch_size),
            "RLHF_DTYPE": args.dtype, "RLHF_MAX_NEW_TOKENS": str(max(args.max_new_tokens, 512)),
            "RLHF_GRACE_SECONDS": "60", "RLHF_TORCH_THREADS": str(args.torch_threads)}


@dataclass
class Tally:
    """What the soak's threads count, time and sample; the clients share it under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("generate_ok", "generate_failed", "feedback_ok", "feedback_failed", "duplicates"), 0))
    failures: dict[str, int] = field(default_factory=dict)  # "rpc: CODE" -> count
    latencies: list[float] = field(default_factory=list)  # of the answered Generate calls, s
    spans: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered) of those calls, monotonic
    swap_windows: list[tuple[float, float]] = field(default_factory=list)  # (activated, served), monotonic
    lateness: list[float] = field(default_factory=list)  # how late each request left against its schedule, s
    acked: list[tuple[str, str]] = field(default_factory=list)  # (completion_id, user_id) of acknowledged ratings
    rss: list[tuple[float, float]] = field(default_factory=list)  # (s since the load started, server RSS in MiB)
    swaps: list[dict[str, Any]] = field(default_factory=list)


class Soak:
    """The load on one generation service: paced clients, an adapter swapper and an RSS sampler."""

    def __init__(self, args: argparse.Namespace, service: launch.Service, registry: Any, sources: list[Path],
                 prompts: list[str]) -> None:
        self.args, self.service, self.registry, self.sources, self.prompts = args, service, registry, sources, prompts
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(service.address))
        self.params = pb.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95)
        self.tally = Tally()
        self.load_start = 0.0  # when the steady load began (0 during the warm-up)
        self.stop = threading.Event()

    def warm_up(self) -> None:
        """The first adapter version and a few requests: first-call allocations are not growth."""
        self.swap()
        for i in range(4):
            self.stub.Generate(pb.GenerateRequest(prompt=self.prompts[i], params=self.params), timeout=300)

    def drive(self) -> float:
        """The steady load for --seconds, with swaps and RSS samples alongside; returns its wall time."""
        self.load_start = time.monotonic()
        clients = [threading.Thread(target=self.client, args=(w,), name=f"client-{w}") for w in range(self.args.clients)]
        helpers = [threading.Thread(target=self.sample_rss, name="rss"), threading.Thread(target=self.swapper, name="swapper")]
        for t in [*clients, *helpers]:
            t.start()
        for t in clients:
            t.join()
        wall = time.monotonic() - self.load_start
        self.tally.rss.append((round(wall, 1), rss_mb(self.service.proc.pid)))
        self.stop.set()
        for t in helpers:
            t.join()
        return wall

    def client(self, w: int) -> None:
        """Client `w`: requests on its fixed schedule (the clients take turns) until the load's end."""
        rng, user = random.Random(w), f"soak-{w}"
        period = self.args.clients / self.args.rate  # each client's interval between requests
        end = self.load_start + self.args.seconds
        n = 0
        while True:
            due = self.load_start + (w / self.args.clients + n) * period
            # The load stops on time: a server that fell behind is not given extra minutes to catch up.
            if due >= end or time.monotonic() >= end:
                return
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.tally.lock:
                self.tally.lateness.append(max(0.0, -wait))
            n += 1
            self.request(rng, user)

    def request(self, rng: random.Random, user: str) -> None:
        """One Generate, then a rating of its completion; each outcome counted."""
        tally = self.tally
        t = time.monotonic()
        try:
            r = self.stub.Generate(pb.GenerateRequest(prompt=rng.choice(self.prompts), params=self.params,
                                                      user_id=user), timeout=120)
        except grpc.RpcError as e:
            self.fail("generate", e)
            return
        with tally.lock:
            tally.counts["generate_ok"] += 1
            tally.latencies.append(time.monotonic() - t)
            tally.spans.append((t, time.monotonic()))
        cid = r.completions[0].completion_id
        rating = rng.choice([pb.RATING_THUMBS_UP, pb.RATING_THUMBS_DOWN])
        try:
            dup = self.stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=cid, rating=rating, user_id=user),
                                           timeout=30).duplicate
        except grpc.RpcError as e:
            self.fail("feedback", e)
            return
        with tally.lock:
            tally.counts["feedback_ok"] += 1
            tally.counts["duplicates"] += int(dup)
            tally.acked.append((cid, user))

    def fail(self, kind: str, e: grpc.RpcError) -> None:
        """Count a failed RPC by its code, and log it."""
        with self.tally.lock:
            self.tally.counts[f"{kind}_failed"] += 1
            key = f"{kind}: {e.code().name}"
            self.tally.failures[key] = self.tally.failures.get(key, 0) + 1
        log.error("soak request failed", extra={"rpc": kind, "code": e.code().name, "details": e.details()})

    def sample_rss(self) -> None:
        """The server's resident memory every 2 s until the load stops."""
        while not self.stop.is_set():
            self.tally.rss.append((round(time.monotonic() - self.load_start, 1), rss_mb(self.service.proc.pid)))
            self.stop.wait(2.0)

    def swapper(self) -> None:
        """A swap every --swap-every seconds of the load."""
        k = 1
        while not self.stop.wait(max(0.0, self.load_start + k * self.args.swap_every - time.monotonic())):
            if time.monotonic() - self.load_start >= self.args.seconds:
                return
            self.swap()
            k += 1

    def swap(self) -> None:
        """Publish the next version, activate it, and time how long from activating until the server serves it."""
        src = self.sources[len(self.tally.swaps) % len(self.sources)]
        version = self.registry.publish(lambda d: [shutil.copy(p, d / p.name) for p in src.iterdir()],
                                        base_model=self.args.base_model, parent=self.registry.current())
        t0 = time.monotonic()
        self.registry.activate(version)
        self.registry.prune(keep=3)
        record = {"version": version, "at_s": round(t0 - self.load_start, 1) if self.load_start else 0.0,
                  "took_s": None}
        self.tally.swaps.append(record)
        end = time.monotonic() + 4 * self.args.adapter_poll_seconds + 60
        while time.monotonic() < end:
            with contextlib.suppress(grpc.RpcError):
                if self.stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).version == version:
                    record["took_s"] = round(time.monotonic() - t0, 2)
                    if self.load_start:
                        self.tally.swap_windows.append((t0, time.monotonic()))
                    return
            time.sleep(0.02)


def recorded_feedback(store_url: str) -> set[tuple[str, str]]:
    """(completion_id, user_id) of every rating in the store."""
    from rlhf_online.store import open_store

    with open_store(store_url) as store:
        return {(f.completion_id, f.user_id) for f in store.list_feedback()}


def _summary(xs: list[float]) -> dict[str, float]:
    """Count, p50 and p99 (s) of some latencies."""
    return {"count": len(xs), "p50_s": round(_percentile(xs, 0.5), 3), "p99_s": round(_percentile(xs, 0.99), 3)}


def latency_by_window(spans: list[tuple[float, float]], windows: list[tuple[float, float]], shift: float
                      ) -> tuple[list[float], list[float], list[float]]:
    """Latencies of the requests in flight during a swap, during a placebo window, and of the rest.

    A request is in flight during a swap when it was sent before the swap was served and answered
    after it was activated. A long request meets more windows than a short one, so that group is
    slower even if a swap cost nothing; the placebo windows (each swap's window moved `shift`
    seconds later, half-way to the next swap, when nothing is swapped) select requests the same
    way, and the difference between the two groups is what a swap costs the requests it meets.
    """
    placebo_windows = [(s0 + shift, s1 + shift) for s0, s1 in windows]
    during: list[float] = []
    placebo: list[float] = []
    outside: list[float] = []
    for a, b in spans:
        if any(a < s1 and b > s0 for s0, s1 in windows):
            during.append(b - a)
        elif any(a < s1 and b > s0 for s0, s1 in placebo_windows):
            placebo.append(b - a)
        else:
            outside.append(b - a)
    return during, placebo, outside


def figures(args: argparse.Namespace, tally: Tally, wall: float, lost: int, exit_code: int) -> dict[str, Any]:
    """The run's figures: counts, latency and schedule percentiles, swaps, and memory growth after the ramp-up."""
    values = [m for _, m in tally.rss]
    start_mb, peak_mb, end_mb = values[0], max(values), values[-1]
    # Memory rises while the batch first fills to the load's steady concurrency (KV caches, allocator
    # pools); growth is judged from the end of that ramp (the first swap, or a quarter of the run).
    ramp = min(args.swap_every, args.seconds / 4)
    steady_mb = next((m for t, m in tally.rss if t >= ramp), start_mb)
    latencies, swaps = tally.latencies, tally.swaps
    during, placebo, outside = latency_by_window(tally.spans, tally.swap_windows, args.swap_every / 2)
    return {"latency_during_swaps": _summary(during), "latency_during_placebo": _summary(placebo),
            "latency_outside_swaps": _summary(outside),
            "seconds": round(wall, 1), **tally.counts, "failures_by_code": tally.failures, "feedback_lost": lost,
            "latency_p50_s": round(_percentile(latencies, 0.5), 3), "latency_p95_s": round(_percentile(latencies, 0.95), 3),
            "latency_max_s": round(max(latencies, default=float("nan")), 3),
            "achieved_rate_per_s": round(tally.counts["generate_ok"] / wall, 2),
            "scheduled": int(args.seconds * args.rate), "sent": len(tally.lateness),
            "schedule_lateness_p95_s": round(_percentile(tally.lateness, 0.95), 3),
            "swaps": swaps, "swaps_ok": sum(1 for s in swaps if s["took_s"] is not None),
            "rss_start_mb": round(start_mb, 1), "rss_peak_mb": round(peak_mb, 1), "rss_end_mb": round(end_mb, 1),
            "rss_steady_start_mb": round(steady_mb, 1), "rss_steady_start_at_s": ramp,
            "rss_growth_mb": round(end_mb - steady_mb, 1), "rss_samples": tally.rss, "server_exit_code": exit_code}


def run(args: argparse.Namespace, model_dir: Path, tmp: Path) -> dict[str, Any]:
    """Start the server, drive it, swap adapters, sample memory; return the figures."""
    from rlhf_online.adapters.registry import AdapterRegistry
    from rlhf_online.data.prompts import load_prompts

    registry = AdapterRegistry(tmp / "adapters")
    sources = make_adapters(model_dir, tmp / "sources")
    prompts = [p.prompt for p in load_prompts("train")]
    store_url = f"sqlite:///{tmp / 'soak.db'}"
    service = launch.start("generation", server_env(args, registry.root, store_url), tmp)
    try:
        soak = Soak(args, service, registry, sources, prompts)
        soak.warm_up()
        wall = soak.drive()
    finally:
        exit_code = service.stop()
    lost = len(set(soak.tally.acked) - recorded_feedback(store_url))
    return figures(args, soak.tally, wall, lost, exit_code)


def table(result: dict) -> list[str]:
    """The Markdown report."""
    r = result["run"]
    swap_times = [s["took_s"] for s in r["swaps"] if s["took_s"] is not None]
    during, placebo, outside = r["latency_during_swaps"], r["latency_during_placebo"], r["latency_outside_swaps"]
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
        f"| latency p50 / p99 (s) of requests in flight during a swap (n) | {during['p50_s']} / {during['p99_s']} "
        f"({during['count']}) |",
        f"| latency p50 / p99 (s) of requests in flight during a placebo window, half-way between swaps (n) | "
        f"{placebo['p50_s']} / {placebo['p99_s']} ({placebo['count']}) |",
        f"| latency p50 / p99 (s) of the others (n) | {outside['p50_s']} / {outside['p99_s']} ({outside['count']}) |",
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
