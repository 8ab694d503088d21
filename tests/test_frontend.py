"""The generation lifecycle both APIs share: submit, stream, log before the end, cancel when abandoned."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path

import pytest
from support import wait_for

from rlhf_online.engine.request import SamplingParams
from rlhf_online.frontend import Abandoned, Frontend
from rlhf_online.store import open_store

REPO = Path(__file__).resolve().parents[1]
SHORT = SamplingParams(max_new_tokens=8, temperature=0.0)
LONG = SamplingParams(max_new_tokens=400, temperature=0.0)


@pytest.fixture
def frontend(make_engine, tmp_path):
    """A factory of frontends over a fresh engine and SQLite store (engine options pass through)."""
    stores = []

    def make(**engine_options) -> Frontend:
        store = open_store(f"sqlite:///{tmp_path / f'store{len(stores)}.db'}")
        stores.append(store)
        return Frontend(make_engine(**engine_options), store)

    yield make
    for s in stores:
        s.close()


def test_every_candidate_is_logged_with_its_version_before_any_last_update(frontend):
    fe = frontend()
    job = fe.submit(prompt="Count to five.", params=SHORT, n=2, user_id="u", metadata={"app": "t"})
    texts: dict[int, str] = {0: "", 1: ""}
    seen_last = []
    for u in fe.stream(job):
        texts[u.index] += u.delta
        if u.result is None:
            assert not seen_last, "a delta after a candidate's last update"
            continue
        seen_last.append(u.index)
        # The caller sees a last update only once every candidate is in the store.
        for cid in job.completion_ids:
            record = fe.store.get_completion(cid)
            assert record.policy_version == job.version and record.user_id == "u"
        assert u.completion_id == job.completion_ids[u.index] and u.result.text == texts[u.index]
    assert seen_last == [0, 1]
    assert [fe.store.get_completion(c).text for c in job.completion_ids] == [texts[0], texts[1]]


def test_generate_returns_what_it_logged(frontend):
    fe = frontend()
    job = fe.submit(messages=(("user", "Say hi."),), params=SHORT, n=2)
    results = fe.generate(job)
    assert [r.completion_tokens for r in results] == [8, 8]
    assert [fe.store.get_completion(c).text for c in job.completion_ids] == [r.text for r in results]


def test_on_an_event_loop_logging_runs_off_the_loop_before_the_end(frontend, monkeypatch):
    fe = frontend()
    writers = []
    real = fe.store.add_completions
    monkeypatch.setattr(fe.store, "add_completions", lambda records: (writers.append(threading.get_ident()),
                                                                       real(records))[1])

    async def run() -> tuple[int, list, list]:
        loop_thread = threading.get_ident()
        job = fe.submit(prompt="Hello", params=SHORT, loop=asyncio.get_running_loop())
        updates = []
        async for u in fe.stream_async(job):
            if u.result is not None:
                assert fe.store.count_completions() == 1  # logged before the caller sees the end
            updates.append(u)
        other = fe.submit(prompt="Hello", params=SHORT, loop=asyncio.get_running_loop())
        return loop_thread, updates, await fe.generate_async(other)

    loop_thread, updates, [again] = asyncio.run(run())
    assert updates[-1].result is not None and all(u.result is None for u in updates[:-1])
    assert updates[-1].result.text == "".join(u.delta for u in updates) == again.text  # greedy: the same text
    assert len(writers) == 2 and loop_thread not in writers and fe.store.count_completions() == 2


def test_a_caller_that_stops_listening_cancels_its_job(frontend):
    fe = frontend(step_delay=0.02)
    job = fe.submit(prompt="Tell me a long story.", params=LONG)
    updates = fe.stream(job)
    assert next(updates).result is None
    updates.close()  # what grpc does to a stream whose client went away
    wait_for(lambda: fe.engine.busy == 0, 30, "the abandoned job to leave the batch")
    assert job.handle.request.cancelled.is_set() and fe.store.count_completions() == 0


def test_leaving_the_job_on_an_event_loop_cancels_it(frontend):
    fe = frontend(step_delay=0.02)

    async def run() -> None:
        job = fe.submit(prompt="Tell me a long story.", params=LONG, loop=asyncio.get_running_loop())
        with pytest.raises(ConnectionResetError), job:
            async for _ in fe.stream_async(job):
                raise ConnectionResetError  # a write to a client that went away
        # The loop stays open until the engine lets the job go: it hands the job's events onto this loop.
        await asyncio.to_thread(wait_for, lambda: fe.engine.busy == 0, 30, "the abandoned job to leave the batch")

    asyncio.run(run())
    assert fe.store.count_completions() == 0


def test_a_cancelled_job_ends_abandoned_and_logs_nothing(frontend):
    fe = frontend(step_delay=0.02)
    job = fe.submit(prompt="Tell me a long story.", params=LONG)
    job.cancel()
    with pytest.raises(Abandoned):
        fe.generate(job)
    assert fe.store.count_completions() == 0


def test_what_the_http_layer_reads_from_the_engine_comes_through_the_frontend(frontend, tiny):
    fe = frontend(max_batch_size=3, max_queue=5)
    tokenizer = tiny[1]
    info = fe.info()
    assert (info.max_batch_size, info.max_queue, info.policy_version) == (3, 5, fe.policy_version)
    assert info.dtype == "float32" and info.device_type == "cpu" and info.limits == fe.engine.config.limits
    assert tokenizer.eos_token_id in fe.eos_ids and fe.token_text(tokenizer.eos_token_id) == tokenizer.eos_token
    assert fe.has_special_tokens(f"{tokenizer.eos_token}hi") and not fe.has_special_tokens("hi")


@pytest.mark.parametrize("module", ["services/generation.py", "services/tgi_http.py"])
def test_the_api_layers_reach_the_engine_only_through_the_frontend(module):
    tree = ast.parse((REPO / module).read_text())
    reached = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("engine", "store")
               and isinstance(n.value, ast.Attribute) and n.value.attr == "frontend"]
    assert reached == [], f"{module} uses frontend.engine/.store at lines {reached}"


def test_a_request_whose_event_loop_closed_is_cancelled_not_the_whole_batch(frontend):
    fe = frontend(step_delay=0.01)
    loop = asyncio.new_event_loop()
    orphan = fe.submit(prompt="Tell me a story.", params=LONG, loop=loop)
    other = fe.submit(prompt="Tell me another story.", params=LONG)  # decodes in the same batch
    first = next(iter(other.handle.events()))
    assert first.delta is not None
    loop.close()  # the orphan's next event cannot be delivered
    wait_for(lambda: orphan.handle.request.cancelled.is_set(), 30, "the orphaned request to be cancelled")
    [result] = other.handle.result()  # the other request was not failed with it
    assert result.completion_tokens > 0 and result.finish_reason in ("length", "eos")


def test_the_log_keeps_the_exact_prompt_and_reply_tokens(frontend):
    """A trainer re-reads a completion token for token: the prompt as the model got it, every token it sampled."""
    fe = frontend()
    job = fe.submit(prompt="Count to five.", params=SamplingParams(max_new_tokens=8, temperature=1.0, seed=3), n=2)
    results = fe.generate(job)
    for cid, r in zip(job.completion_ids, results, strict=True):
        record = fe.store.get_completion(cid)
        assert record.prompt_token_ids == tuple(fe.engine.encode_prompt("Count to five."))
        assert record.token_ids == r.token_ids and len(record.token_ids) == record.completion_tokens >= 1
        assert fe.engine.tokenizer.decode(list(record.token_ids), skip_special_tokens=True) == record.text
