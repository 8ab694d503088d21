"""`rlhf-online demo`: the generation service on the embedded defaults, called like an application would.

So far this shows the serving half of the loop (generate, stream, log, feedback, metrics); the
simulated users, reward retraining, PPO rounds and hot-swaps join it with issue 5.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPTS = [
    "My neighbour keeps parking in my spot. Write him a note.",
    "Review the cafe that got my order wrong twice.",
    "Someone called my code garbage in a review. Reply to them.",
    "What do you think of Mondays?",
    "My flight got cancelled again. Write a message to the airline.",
    "Give me your honest opinion of pineapple on pizza.",
    "A stranger was rude to me on the bus. What should I say next time?",
    "Write a short reply to a friend who forgot my birthday.",
]


def main(args: argparse.Namespace) -> int:
    """Serve the real model on loopback, send requests and feedback, print what happened."""
    import grpc

    from rlhf_online.config import GenerationSettings
    from rlhf_online.store import open_store
    from rlhf_online.v1 import generation_pb2 as pb
    from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
    from services.bootstrap import build_engine, set_threads
    from services.generation import start_generation_server

    run_dir = Path(tempfile.mkdtemp(prefix="rlhf-demo-"))
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", data_dir=Path(args.data_dir),
                                  store_url=f"sqlite:///{run_dir / 'demo.db'}", adapter_dir=run_dir / "adapters")
    set_threads(settings)
    print(f"Loading {settings.base_model} (provisioned under {args.data_dir}/models) ...", flush=True)
    store = open_store(settings.store_url)
    running = start_generation_server(settings, build_engine(settings).start(), store)
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    print(f"Generation service on 127.0.0.1:{running.port}, metrics on :{running.metrics_port}\n", flush=True)
    rng = random.Random(0)
    params = pb.SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95)
    try:
        t0 = time.perf_counter()
        futures = [stub.Generate.future(pb.GenerateRequest(prompt=p, params=params, n=2, user_id=f"user{i}"),
                                        timeout=600) for i, p in enumerate(PROMPTS[: args.requests])]
        for i, (prompt, fut) in enumerate(zip(PROMPTS, futures, strict=False)):
            r = fut.result()
            a, b = r.completions
            print(f"[{i}] {prompt}\n    A: {a.text.strip()[:160]!r}\n    B: {b.text.strip()[:160]!r}")
            chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
            stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=chosen.completion_id,
                                                         rating=pb.RATING_THUMBS_UP, user_id=f"user{i}"))
            stub.SubmitFeedback(pb.SubmitFeedbackRequest(completion_id=rejected.completion_id,
                                                         rating=pb.RATING_THUMBS_DOWN, user_id=f"user{i}"))
            stub.SubmitPreference(pb.SubmitPreferenceRequest(chosen_completion_id=chosen.completion_id,
                                                             rejected_completion_id=rejected.completion_id,
                                                             user_id=f"user{i}"))
        wall = time.perf_counter() - t0
        print("\nStreaming: ", end="", flush=True)
        for chunk in stub.GenerateStream(pb.GenerateRequest(prompt="Count from one to five.", params=params)):
            print(chunk.text_delta, end="", flush=True)
        policy = stub.GetPolicy(pb.GetPolicyRequest())
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
        tokens = next(float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("rlhf_generation_tokens_total "))
        print(f"\n\n{len(futures)} requests x 2 candidates in {wall:.1f}s, batched together ({tokens:.0f} tokens, "
              f"{tokens / wall:.1f} tokens/s on {os.cpu_count()} cores)")
        print(f"Store: {store.count_completions()} completions, {store.count_feedback()} feedback, "
              f"policy {policy.version or '(bare base)'} of {policy.base_model}; files in {run_dir}")
        print("The closed loop (simulated users -> reward service -> PPO trainer -> hot-swap) joins this demo "
              "with issue 5; each service already runs on its own: rlhf-online serve {generation,reward,trainer}.")
    finally:
        running.shutdown(5)
    return 0
