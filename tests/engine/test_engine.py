"""The continuous-batching engine on the tiny random model."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rlhf_online.engine.request import Limits, SamplingParams
from rlhf_online.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
PROMPTS = ["Hello there.", "Tell me a long story about a dragon who lived in the mountains.", "Why?",
           "Write a haiku about tea and biscuits on a rainy afternoon in the garden."]


def hf_greedy(tiny, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Reference output: plain model.generate on one prompt."""
    model, tok = tiny
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def wait_until(cond, timeout: float = 30.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_greedy_matches_model_generate(make_engine, tiny):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPTS[1])
    [result] = engine.submit(ids, GREEDY).result()
    assert result.text == hf_greedy(tiny, ids, 12)
    assert result.completion_tokens == 12 and result.finish_reason == "length"


def test_concurrent_prompts_of_different_lengths_batch_and_match_solo_outputs(make_engine, tiny):
    engine = make_engine(max_batch_size=8)
    encoded = [engine.encode_prompt(p) for p in PROMPTS]
    expected = [hf_greedy(tiny, ids, 12) for ids in encoded]
    handles = [engine.submit(ids, GREEDY) for ids in encoded]
    got = [h.result()[0].text for h in handles]
    assert got == expected  # left padding, merging and eviction change nothing
    assert engine.stats["max_rows"] > 1


def test_late_request_joins_running_batch_and_finishes_first(make_engine):
    engine = make_engine(step_delay=0.01, max_batch_size=4)
    long = engine.submit(engine.encode_prompt(PROMPTS[0]), SamplingParams(max_new_tokens=200, temperature=0.0))
    events = long.events()
    next(events)  # the long request is decoding
    short = engine.submit(engine.encode_prompt(PROMPTS[2]), SamplingParams(max_new_tokens=3, temperature=0.0))
    assert short.result()[0].completion_tokens == 3
    assert engine.busy == 1  # the long one is still running: the short one did not wait for it
    assert engine.stats["max_rows"] == 2
    long.cancel()


def test_n_candidates_and_seeds(make_engine):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPTS[0])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    a = engine.submit(ids, params, n=3).result()
    b = engine.submit(ids, params, n=3).result()
    assert len(a) == 3
    assert [c.text for c in a] == [c.text for c in b]  # same seed, same texts
    assert len({c.text for c in a}) > 1  # candidate k uses seed + k


def test_stop_string_cuts_text(make_engine, tiny):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPTS[3])
    full = engine.submit(ids, SamplingParams(max_new_tokens=20, temperature=0.0)).result()[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    [r] = engine.submit(ids, SamplingParams(max_new_tokens=20, temperature=0.0, stop=(stop,))).result()
    assert r.finish_reason == "stop"
    assert r.text == full[: full.index(stop)]


def test_eos_finishes_candidate(make_engine):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPTS[0])
    first = engine.submit(ids, SamplingParams(max_new_tokens=1, temperature=0.0)).result()
    # Declare the greedy first token an EOS: the candidate must end there with reason "eos".
    token = engine.tokenizer.encode(first[0].text, add_special_tokens=False)[0]
    engine.eos_ids = engine.eos_ids | {token}
    [r] = engine.submit(ids, GREEDY).result()
    assert (r.finish_reason, r.completion_tokens, r.text) == ("eos", 1, "")


def test_streamed_deltas_concatenate_to_the_text(make_engine):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPTS[1])
    events = list(engine.submit(ids, SamplingParams(max_new_tokens=16, temperature=0.0)).events())
    whole = engine.submit(ids, SamplingParams(max_new_tokens=16, temperature=0.0)).result()[0].text
    assert len(events) > 1
    assert "".join(e.delta for e in events) == whole
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_deadline_stops_generation_and_frees_the_slot(make_engine):
    engine = make_engine(step_delay=0.01)
    # Seeded: this draw samples all 500 tokens (no early EOS), so only the deadline can end it early.
    h = engine.submit(engine.encode_prompt(PROMPTS[0]), SamplingParams(max_new_tokens=500, temperature=1.0, seed=0),
                      deadline=time.monotonic() + 0.3)
    with pytest.raises(DeadlineExceeded):
        h.result()
    assert wait_until(lambda: engine.busy == 0)


def test_cancel_frees_the_slot(make_engine):
    engine = make_engine(step_delay=0.01)
    h = engine.submit(engine.encode_prompt(PROMPTS[0]), SamplingParams(max_new_tokens=500, temperature=1.0))
    next(h.events())
    h.cancel()
    assert wait_until(lambda: engine.busy == 0)
    steps = engine.stats["steps"]
    time.sleep(0.2)  # ~20 steps' time: an engine still decoding the cancelled row would count them
    assert engine.stats["steps"] == steps  # idle: no compute is spent on it after the cancel


def test_full_queue_is_resource_exhausted(make_engine):
    engine = make_engine(step_delay=0.01, max_batch_size=1, max_queue=1)
    long = SamplingParams(max_new_tokens=400, temperature=1.0)
    ids = engine.encode_prompt(PROMPTS[0])
    running = engine.submit(ids, long)
    next(running.events())  # admitted: the queue is empty again
    waiting = engine.submit(ids, long)
    with pytest.raises(ResourceExhausted):
        engine.submit(ids, long)
    running.cancel()
    waiting.cancel()


@pytest.mark.parametrize("params,n,field", [
    (SamplingParams(max_new_tokens=0), 1, "params.max_new_tokens"),
    (SamplingParams(max_new_tokens=10_000), 1, "params.max_new_tokens"),
    (SamplingParams(temperature=-1.0), 1, "params.temperature"),
    (SamplingParams(temperature=float("nan")), 1, "params.temperature"),
    (SamplingParams(top_p=1.5), 1, "params.top_p"),
    (SamplingParams(stop=("",)), 1, "params.stop"),
    (SamplingParams(), 0, "n"),
    (SamplingParams(), 99, "n"),
])
def test_bad_params_name_the_field(make_engine, params, n, field):
    engine = make_engine()
    with pytest.raises(InvalidArgument) as e:
        engine.submit(engine.encode_prompt("hi"), params, n=n)
    assert e.value.field == field


def test_prompt_limits(make_engine):
    engine = make_engine(limits=Limits(max_prompt_tokens=64))
    with pytest.raises(InvalidArgument, match="prompt"):
        engine.encode_prompt("word " * 100)
    with pytest.raises(InvalidArgument, match="prompt"):
        engine.encode_prompt("   ")
    with pytest.raises(InvalidArgument) as e:
        engine.encode_messages([("user", "hi"), ("wizard", "hello")])
    assert e.value.field == "messages[1].role"
    ids = engine.encode_messages([("system", "Be brief."), ("user", "hi")])
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_drain_refuses_new_but_finishes_running(make_engine):
    engine = make_engine(step_delay=0.01)
    ids = engine.encode_prompt(PROMPTS[0])
    h = engine.submit(ids, SamplingParams(max_new_tokens=20, temperature=0.0))
    engine.drain()
    with pytest.raises(Unavailable):
        engine.submit(ids, GREEDY)
    assert h.result()[0].completion_tokens == 20


def test_many_threads_all_answered(make_engine):
    engine = make_engine(max_batch_size=4, max_queue=64)
    results, errors = [], []

    def client(i: int) -> None:
        try:
            h = engine.submit(engine.encode_prompt(PROMPTS[i % 4]),
                              SamplingParams(max_new_tokens=4 + i % 5, temperature=0.7, seed=i))
            results.append(h.result()[0])
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 24
    assert engine.stats["max_rows"] == 4


def test_rows_wait_while_the_padded_cache_would_pass_max_batch_tokens(make_engine):
    """Four rows fit the batch but only two the cache budget: the others wait, and everyone is answered."""
    probe = make_engine()
    encoded = [probe.encode_prompt(PROMPTS[0])] * 4
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    per_row = len(encoded[0]) + params.max_new_tokens  # the cache positions one row reserves
    engine = make_engine(max_batch_size=4, max_batch_tokens=2 * per_row)
    handles = [engine.submit(ids, params) for ids in encoded]
    assert all(h.result()[0].completion_tokens == 16 for h in handles)
    assert engine.stats["max_rows"] == 2


def test_running_the_loop_on_the_callers_thread_leaves_its_grad_mode_alone(tiny):
    from rlhf_online.engine.engine import Engine

    engine = Engine(tiny[0], tiny[1])
    result = {}

    def client():
        result["r"] = engine.submit(engine.encode_prompt("hi"), GREEDY).result()
        engine.stop()

    t = threading.Thread(target=client)
    t.start()
    engine.run()  # here, on this thread, as servers do on their main thread
    t.join()
    assert result["r"][0].completion_tokens == 12
    assert torch.is_grad_enabled()


def test_a_second_start_is_refused_since_two_loops_would_step_one_batch(make_engine):
    engine = make_engine()  # started
    with pytest.raises(RuntimeError, match="already running"):
        engine.start()
