"""Deadlines and cancellation: the call ends with the right code and the engine stops spending compute on it.

"Stops" is measured, not assumed: the engine's running-rows gauge and busy count drop to zero, its
decode-step counter stands still afterwards, and far fewer tokens were generated than asked for.
"""

from __future__ import annotations

import time

import grpc

from rlhf_online.v1 import generation_pb2 as pb

STEP_DELAY = 0.02  # seconds per decode step: a 500-token request would take 10 s
LONG = pb.GenerateRequest(prompt="Tell me a very long story.",
                          params=pb.SamplingParams(max_new_tokens=500, temperature=1.0))
SHORT = pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=4))


def assert_engine_idle(g, kit, what: str) -> None:
    """No row decoding, nothing queued, and the step counter standing still."""
    # The gauges are set by the engine's loop after it frees the slot: wait for all three, not one and then
    # the others (under load the loop's next pass came after the check: running_rows still 1).
    kit.wait_for(lambda: g.engine.busy == 0 and kit.sample("rlhf_generation_running_rows") == 0
                 and kit.sample("rlhf_generation_queue_depth") == 0, 10, f"the engine to free {what}")
    steps = g.engine.stats["steps"]
    time.sleep(10 * STEP_DELAY)
    assert g.engine.stats["steps"] == steps, "the engine kept decoding for an abandoned request"


def test_deadline_shorter_than_the_generation(generation, kit):
    g = generation(step_delay=STEP_DELAY)
    tokens = kit.sample("rlhf_generation_tokens_total")
    internal = kit.rpcs("Generation", "Generate", "INTERNAL")
    exceeded = kit.rpcs("Generation", "Generate", "DEADLINE_EXCEEDED")
    t0 = time.monotonic()
    got, _ = kit.code(lambda: g.stub.Generate(LONG, timeout=0.5))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2
    assert_engine_idle(g, kit, "the expired request's slot")
    generated = kit.sample("rlhf_generation_tokens_total") - tokens
    assert generated < 100, f"{generated} tokens generated for a request abandoned after 0.5 s"
    # The server counts it as the client's deadline, not as a failure of its own.
    kit.wait_for(lambda: kit.rpcs("Generation", "Generate", "DEADLINE_EXCEEDED") == exceeded + 1, 5,
                 "the RPC to be counted as DEADLINE_EXCEEDED")
    assert kit.rpcs("Generation", "Generate", "INTERNAL") == internal
    assert g.stub.Generate(SHORT, timeout=30).completions[0].completion_tokens == 4


def test_deadline_on_a_stream(generation, kit):
    g = generation(step_delay=STEP_DELAY)
    received = []
    got, _ = kit.code(lambda: received.extend(g.stub.GenerateStream(LONG, timeout=0.5)))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED and received  # it streamed, then the deadline ended it
    assert_engine_idle(g, kit, "the stream's slot")
    assert len(list(g.stub.GenerateStream(SHORT, timeout=30)))


def test_cancelled_stream_frees_its_slot(generation, kit):
    g = generation(step_delay=STEP_DELAY)
    cancelled = kit.sample("rlhf_generation_requests_total", outcome="cancelled")
    counted = kit.rpcs("Generation", "GenerateStream", "CANCELLED")
    internal = kit.rpcs("Generation", "GenerateStream", "INTERNAL")
    stream = g.stub.GenerateStream(LONG, timeout=60)
    next(stream), next(stream)
    assert g.engine.busy == 1 and kit.sample("rlhf_generation_running_rows") == 1
    steps = g.engine.stats["steps"]
    stream.cancel()
    assert_engine_idle(g, kit, "the cancelled stream's slot")
    assert g.engine.stats["steps"] - steps < 20  # stopped at the next step or so, not after 500
    assert kit.sample("rlhf_generation_requests_total", outcome="cancelled") == cancelled + 1
    kit.wait_for(lambda: kit.rpcs("Generation", "GenerateStream", "CANCELLED") == counted + 1, 5,
                 "the RPC to be counted as CANCELLED")
    assert kit.rpcs("Generation", "GenerateStream", "INTERNAL") == internal
    assert g.stub.Generate(SHORT, timeout=30).completions


def test_cancelled_unary_call_frees_its_slot(generation, kit):
    g = generation(step_delay=STEP_DELAY)
    internal = kit.rpcs("Generation", "Generate", "INTERNAL")
    future = g.stub.Generate.future(LONG, timeout=60)
    kit.wait_for(lambda: kit.sample("rlhf_generation_running_rows") == 1, 5, "the request to run")
    future.cancel()
    assert_engine_idle(g, kit, "the cancelled call's slot")
    kit.wait_for(lambda: kit.rpcs("Generation", "Generate", "CANCELLED") >= 1, 5, "the RPC to be counted")
    assert kit.rpcs("Generation", "Generate", "INTERNAL") == internal
    assert g.stub.Generate(SHORT, timeout=30).completions


def test_a_queued_request_past_its_deadline_never_runs(generation, kit):
    g = generation(step_delay=STEP_DELAY, max_batch_size=1)
    blocker = g.stub.GenerateStream(LONG, timeout=60)
    next(blocker)  # the only batch slot is taken
    prefills = g.engine.stats["prefills"]
    got, _ = kit.code(lambda: g.stub.Generate(SHORT, timeout=0.3))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    kit.wait_for(lambda: kit.sample("rlhf_generation_queue_depth") == 0, 5, "the queue to drop the request")
    assert g.engine.stats["prefills"] == prefills  # evicted from the queue without ever being prefilled
    blocker.cancel()
    assert_engine_idle(g, kit, "the blocker's slot")
    assert g.stub.Generate(SHORT, timeout=30).completions
