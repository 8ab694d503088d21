"""The TGI-compatible HTTP API, driven by the real `text_generation` Client and AsyncClient."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException

import pytest
from support import admitted, post, wait_for
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError

from rlhf_online.config import GenerationSettings
from rlhf_online.store import open_store
from services.bootstrap import engine_config
from services.generation import start_generation_server


@pytest.fixture
def http(make_engine, tmp_path):
    """Start gRPC + HTTP around a tiny engine; returns a factory (step_delay, overrides) -> (base url, store)."""
    servers = []

    def start(step_delay: float = 0.0, **overrides):
        settings = GenerationSettings(port=0, metrics_port=0, http_port=0, host="127.0.0.1", data_dir=tmp_path,
                                      store_url=f"sqlite:///{tmp_path / 'store.db'}", **overrides)
        cfg = engine_config(settings)  # the same engine config production derives from settings
        engine = make_engine(step_delay=step_delay, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
                             limits=cfg.limits)
        store = open_store(settings.store_url)
        running = start_generation_server(settings, engine, store)
        servers.append(running)
        return f"http://127.0.0.1:{running.http_port}", store, running

    yield start
    for s in servers:
        s.shutdown(2)


def post_keeping_errors(url: str, body: dict, out: dict) -> None:
    """post() for a thread: its response goes to out["r"], or a dropped connection to out["error"]."""
    try:
        out["r"] = post(url, body)
    except (urllib.error.URLError, HTTPException, ConnectionError) as e:
        out["error"] = e


def health_status(url: str) -> int:
    """The HTTP status of GET /health."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_client_generate_with_details_params_and_logging(http):
    url, store, _ = http()
    c = Client(url, timeout=30)
    r = c.generate("Say something nice about tea.", max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9,
                   top_k=20, seed=5)
    assert r.details.generated_tokens == 7 and r.details.finish_reason.value == "length"
    assert r.details.seed == 5 and len(r.details.tokens) == 7
    assert r.generated_text == c.generate("Say something nice about tea.", max_new_tokens=7, do_sample=True,
                                          temperature=0.7, top_p=0.9, top_k=20, seed=5).generated_text
    greedy = c.generate("Say something nice about tea.", max_new_tokens=7)
    assert greedy.generated_text == c.generate("Say something nice about tea.", max_new_tokens=7).generated_text
    full = c.generate("Hi", max_new_tokens=3, return_full_text=True)
    assert full.generated_text.startswith("Hi")
    assert store.count_completions() == 5


def test_stop_sequence_and_finish_reason(http):
    url, _, _ = http()
    c = Client(url, timeout=30)
    text = c.generate("Tell me a story.", max_new_tokens=20).generated_text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    r = c.generate("Tell me a story.", max_new_tokens=20, stop_sequences=[stop])
    assert r.details.finish_reason.value == "stop_sequence"
    assert r.generated_text == text[: text.index(stop)]


def test_stream_tokens_concatenate_to_the_final_text(http):
    url, _, _ = http()
    events = list(Client(url, timeout=30).generate_stream("Count to three.", max_new_tokens=10))
    assert len(events) == 10  # one event per token
    assert [e.details is None for e in events] == [True] * 9 + [False]
    assert events[-1].details.generated_tokens == 10
    assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text


def test_async_client(http):
    url, _, _ = http()

    async def run():
        c = AsyncClient(url, timeout=30)
        r = await c.generate("Hello", max_new_tokens=4)
        stream = [e async for e in c.generate_stream("Hello", max_new_tokens=4)]
        return r, stream

    r, stream = asyncio.run(run())
    assert r.details.generated_tokens == 4 and stream[-1].generated_text == r.generated_text


def test_validation_errors_are_the_clients_own_exception(http):
    url, _, _ = http(max_prompt_tokens=64)
    c = Client(url, timeout=30)
    with pytest.raises(ValidationError, match="inputs"):
        c.generate("word " * 200, max_new_tokens=4)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        c.generate("hi", max_new_tokens=100_000)
    status, _, body = post(f"{url}/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1.3}})
    assert (status, body["error_type"]) == (422, "validation") and "repetition_penalty" in body["error"]
    status, _, body = post(f"{url}/generate", {"inputs": ""})
    assert status == 422 and "inputs" in body["error"]


def test_overload_is_429(http, wait_queue_depth):
    url, _, running = http(step_delay=0.02, max_batch_size=1, max_queue=1)
    long = {"inputs": "Go on.", "parameters": {"max_new_tokens": 300, "do_sample": True}}
    threads = [threading.Thread(target=post_keeping_errors, args=(f"{url}/generate", long, {}), daemon=True)
               for _ in range(2)]  # cut off when the fixture stops the server: nothing of theirs is checked
    threads[0].start()
    wait_for(admitted(running), 30, "the first request to start decoding")  # the only batch slot taken
    threads[1].start()
    wait_queue_depth(1, timeout=30)  # the second waits in the one queue place
    with pytest.raises(OverloadedError):
        Client(url, timeout=30).generate("one more", max_new_tokens=2)


def test_feedback_over_http_by_header_id(http):
    url, store, _ = http()
    status, headers, body = post(f"{url}/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert status == 200 and body["generated_text"]
    cid = headers["X-Completion-Id"]
    assert store.get_completion(cid).text == body["generated_text"]
    fb = {"completion_id": cid, "rating": "thumbs_up", "user_id": "u1", "comment": "nice"}
    assert post(f"{url}/feedback", fb)[2] == {"duplicate": False}
    assert post(f"{url}/feedback", fb)[2] == {"duplicate": True}
    [f] = store.list_feedback()
    assert (f.completion_id, f.rating, f.comment) == (cid, "thumbs_up", "nice")
    assert post(f"{url}/feedback", {**fb, "completion_id": "nope"})[0] == 404
    assert post(f"{url}/feedback", {**fb, "rating": "meh"})[0] == 422
    _, h2, _ = post(f"{url}/generate", {"inputs": "Hello again", "parameters": {"max_new_tokens": 5}})
    pref = {"chosen_completion_id": cid, "rejected_completion_id": h2["X-Completion-Id"], "user_id": "u1"}
    assert post(f"{url}/preference", pref)[2] == {"duplicate": False}
    assert post(f"{url}/preference", {**pref, "rejected_completion_id": cid})[0] == 422
    _, h3, _ = post(f"{url}/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "do_sample": True}})
    ranking = {"completion_ids": [h3["X-Completion-Id"], cid], "user_id": "u1"}  # two replies to "Hello"
    assert post(f"{url}/ranking", ranking)[:3:2] == (200, {"duplicate": False})
    assert post(f"{url}/ranking", ranking)[2] == {"duplicate": True}
    assert store.list_rankings()[0].completion_ids == (h3["X-Completion-Id"], cid)
    for bad, status, field in [({"completion_ids": "x"}, 422, "completion_ids"),
                               ({"completion_ids": [cid]}, 422, "completion_ids"),
                               ({"completion_ids": [cid, cid]}, 422, "completion_ids"),
                               ({"completion_ids": [cid, h2["X-Completion-Id"]]}, 422, "completion_ids"),
                               ({"completion_ids": [cid, "nope"]}, 404, "nope")]:
        got, _, body = post(f"{url}/ranking", bad)
        assert got == status and field in body["error"], (bad, body)
    assert store.count_rankings() == 1


def test_info_health_and_drain(http):
    url, _, running = http(step_delay=0.02)
    info = json.loads(urllib.request.urlopen(f"{url}/info", timeout=5).read())
    assert info["model_pipeline_tag"] == "text-generation" and info["max_input_tokens"] == 2048
    assert urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(f"{url}/generate", {
        "inputs": "Go on.", "parameters": {"max_new_tokens": 50}})))
    t.start()
    wait_for(admitted(running), 30, "the request to start decoding")
    assert t.is_alive()  # 50 tokens at >= 20 ms a step: still decoding when the drain begins
    stopper = threading.Thread(target=running.shutdown, args=(30,))
    stopper.start()
    wait_for(lambda: health_status(url) == 503, 30, "/health to answer 503")
    assert post(f"{url}/generate", {"inputs": "new", "parameters": {"max_new_tokens": 2}})[0] == 503
    t.join(60)
    stopper.join(60)
    status, headers, body = result["r"]  # in flight when the drain began: it finished
    assert status == 200 and body["generated_text"] and headers["X-Generated-Tokens"] == "50"


def test_the_drain_waits_for_an_http_request_past_the_engine(http, monkeypatch, tmp_path):
    url, store, running = http()
    _, headers, _ = post(f"{url}/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    entered, add_feedback = threading.Event(), store.add_feedback

    def slow_add_feedback(*args, **kwargs):  # a store write that takes its time (a busy database)
        entered.set()
        time.sleep(5)  # longer than the 2 s the stop gives a handler past the grace period
        return add_feedback(*args, **kwargs)

    monkeypatch.setattr(store, "add_feedback", slow_add_feedback)
    result: dict = {}
    t = threading.Thread(target=post_keeping_errors, args=(f"{url}/feedback", {
        "completion_id": headers["X-Completion-Id"], "rating": "thumbs_up", "user_id": "u1"}, result))
    t.start()
    assert entered.wait(30)
    running.shutdown(30)  # nothing in the engine: only the HTTP handler is still at work
    t.join(30)
    assert result.get("r", (None, None, None))[0] == 200, result  # acknowledged within the grace period
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as reopened:  # the server closed its own
        [f] = reopened.list_feedback()
    assert f.completion_id == headers["X-Completion-Id"]


def test_a_request_running_past_the_grace_period_is_ended_not_waited_for(http):
    url, _, running = http(step_delay=0.05)
    result: dict = {}
    t = threading.Thread(target=post_keeping_errors, args=(f"{url}/generate", {
        "inputs": "Go on.", "parameters": {"max_new_tokens": 500}}, result))
    t.start()
    wait_for(admitted(running), 30, "the request to start decoding")
    started = time.monotonic()
    running.shutdown(0.5)  # 500 tokens at >= 50 ms a step need 25 s: far past the grace
    took = time.monotonic() - started
    t.join(30)
    assert took < 15, took  # aiohttp's own default waits 60 s for running handlers
    assert "error" in result or result["r"][0] != 200, result  # cut off: an error status or a closed connection
