"""LoRA adapters in the engine: load beside the base, pin requests to their version, unload when idle."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rlhf_online.engine import lora_mix
from rlhf_online.engine.request import SamplingParams

PARAMS = SamplingParams(max_new_tokens=24, temperature=0.0)
PROMPT = "Tell me about the weather in the mountains."


def random_lora(tiny, out, seed: int = 0, r: int = 8):
    """A random (non-identity) LoRA on q/k/v/o of the tiny model, saved by PEFT."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny[0]), cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    return random_lora(tiny, tmp_path_factory.mktemp("adapter"))


def greedy_ids(model, tok, prompt_ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def test_requests_finish_on_the_version_they_started_on(make_engine, tiny, adapter_dir):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPT)
    base_text = greedy_ids(tiny[0], tiny[1], ids, 24)
    lora = PeftModel.from_pretrained(copy.deepcopy(tiny[0]), adapter_dir).eval()
    lora_text = greedy_ids(lora, tiny[1], ids, 24)
    assert base_text != lora_text  # the adapter really changes the policy

    on_base = engine.submit(ids, PARAMS)
    events = on_base.events()
    first = next(events)
    engine.load_adapter("v000001", adapter_dir)
    engine.set_current("v000001")
    on_new = engine.submit(ids, PARAMS)
    rest = "".join(e.delta for e in events)
    assert on_base.version == "" and on_new.version == "v000001"
    assert first.delta + rest == base_text  # the swap mid-request left its version alone
    assert on_new.result()[0].text == lora_text
    assert engine.policy_version == "v000001"


def _two_requests_in_one_batch(engine, ids, between):
    """Run one request, call `between()` inside its first step, then a second that is certain to join its batch.

    Returns both handles, their first candidates once finished, and each forward's per-row adapters.
    """
    calls: list[list[str]] = []
    entered, release = threading.Event(), threading.Event()
    forward = engine._forward

    def gated(adapters, **kw):  # records each step's adapter per row; holds the first step until released
        calls.append(list(adapters))
        entered.set()
        assert release.wait(30), "the test never released the engine"
        return forward(adapters, **kw)

    engine._forward = gated
    try:
        first = engine.submit(ids, PARAMS)
        assert entered.wait(30), "the first request was never prefilled"
        between()  # the engine is inside the first request's first step: the second is certain to join it
        second = engine.submit(ids, PARAMS)
        release.set()
        return first, second, (first.result()[0], second.result()[0]), calls
    finally:
        engine._forward = forward


def _assert_greedy_under(model, prompt_ids, result, tol: float = 1e-3) -> None:
    """Each token the engine chose is `model`'s most likely next one, teacher-forced, up to `tol` in logits.

    Texts compared whole would fail on a near-tie: the tiny random model had one at 6e-6 between its two
    best tokens, which the stacked pass and model.generate round to different sides on some CPUs. A row
    on the wrong version's weights misses by whole logits (5-9 measured).
    """
    toks = list(result.token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + toks])).logits[0, len(prompt_ids) - 1:-1]  # [T, V]
    gaps = logits.max(-1).values - logits.gather(1, torch.tensor(toks).unsqueeze(1)).squeeze(1)
    assert len(toks) > 1 and float(gaps.max()) <= tol, gaps


def test_rows_of_two_versions_decode_in_one_batch(make_engine, tiny, adapter_dir):
    """A request on the base and one on an adapter share decode steps, and each gets its own policy's text."""
    from rlhf_online.engine.engine import BASE

    engine = make_engine()
    ids = engine.encode_prompt(PROMPT)
    base_text = greedy_ids(tiny[0], tiny[1], ids, 24)
    lora_text = greedy_ids(PeftModel.from_pretrained(copy.deepcopy(tiny[0]), adapter_dir).eval(), tiny[1], ids, 24)
    engine.load_adapter("v000001", adapter_dir)  # loaded, not current: new requests still go to the base
    on_base, on_new, results, calls = _two_requests_in_one_batch(engine, ids, lambda: engine.set_current("v000001"))
    assert (results[0].text, results[1].text) == (base_text, lora_text)
    assert on_base.version == "" and on_new.version == "v000001"
    both = sorted([BASE, engine._adapters["v000001"]])  # the version's PEFT adapter name (its layer slot)
    assert any(sorted(c) == both for c in calls), calls  # one forward carried both versions


def test_idle_old_version_is_unloaded(make_engine, adapter_dir):
    engine = make_engine()
    engine.load_adapter("v000001", adapter_dir)
    engine.set_current("v000001")
    engine.load_adapter("v000002", adapter_dir)
    time.sleep(0.2)
    assert engine.loaded_versions() == ["v000001", "v000002"]  # staged, not yet current: kept
    engine.set_current("v000002")
    ids = engine.encode_prompt(PROMPT)
    engine.submit(ids, SamplingParams(max_new_tokens=2)).result()  # a step runs the unloader
    end = time.time() + 30
    while engine.loaded_versions() != ["v000002"] and time.time() < end:
        time.sleep(0.05)
    assert engine.loaded_versions() == ["v000002"]
    engine.set_current("")
    engine.submit(ids, SamplingParams(max_new_tokens=2)).result()
    assert engine.submit(ids, PARAMS).result()[0].completion_tokens == 24  # the bare base still serves


def test_unknown_version_cannot_become_current(make_engine):
    from rlhf_online.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        make_engine().set_current("v000009")


def test_retired_version_is_unloaded_even_when_the_server_goes_idle(make_engine, adapter_dir):
    engine = make_engine()
    engine.load_adapter("v000001", adapter_dir)
    engine.set_current("v000001")
    engine.submit(engine.encode_prompt(PROMPT), SamplingParams(max_new_tokens=2)).result()
    engine.set_current("")  # no request follows: only the idle loop can unload it
    end = time.time() + 30
    while engine.loaded_versions():
        assert time.time() < end, "retired adapter stayed loaded on an idle server"
        time.sleep(0.02)


def canary_beside_the_base(make_engine, tiny, adapter_dir):
    """A started engine serving the bare base with the adapter as its canary, a prompt, and each one's greedy text."""
    engine = make_engine()
    ids = engine.encode_prompt(PROMPT)
    base_text = greedy_ids(tiny[0], tiny[1], ids, 24)
    lora_text = greedy_ids(PeftModel.from_pretrained(copy.deepcopy(tiny[0]), adapter_dir).eval(), tiny[1], ids, 24)
    engine.load_adapter("v000001", adapter_dir)
    engine.set_canary("v000001")
    return engine, ids, base_text, lora_text


def test_an_interleaved_request_decodes_each_candidate_on_its_own_version(make_engine, tiny, adapter_dir):
    """Canary and stable candidates of one request: each gets its own policy's greedy text (its own prefill too)."""
    engine, ids, base_text, lora_text = canary_beside_the_base(make_engine, tiny, adapter_dir)
    assert (engine.policy_version, engine.canary_version) == ("", "v000001")
    h = engine.submit(ids, PARAMS, n=4, route=lambda stable, canary: [canary, stable, stable, canary])
    assert h.versions == ("v000001", "", "", "v000001") and h.request.canary == "v000001"
    assert [r.text for r in h.result()] == [lora_text, base_text, base_text, lora_text]
    plain = engine.submit(ids, PARAMS, n=2)  # no route: every candidate on the stable version
    assert plain.versions == ("", "") and plain.request.canary == ""
    first, second = plain.result()
    assert first.text == second.text  # both greedy on the base, in one batch


def test_base_only_and_adapter_only_batches_alternate_beside_a_resident_adapter(make_engine, tiny, adapter_dir):
    """The engine switches the LoRA layers off for a batch of bare-base rows and on again for the adapter's rows."""
    engine, ids, base_text, lora_text = canary_beside_the_base(make_engine, tiny, adapter_dir)
    assert base_text != lora_text
    on_canary = lambda stable, canary: [canary]  # noqa: E731
    for _ in range(2):  # each request runs alone: every step is base-only or adapter-only, in turn
        assert engine.submit(ids, PARAMS).result()[0].text == base_text
        assert engine.submit(ids, PARAMS, route=on_canary).result()[0].text == lora_text
    mixed = engine.submit(ids, PARAMS, n=2, route=lambda stable, canary: [stable, canary])
    assert [r.text for r in mixed.result()] == [base_text, lora_text]
    assert engine.submit(ids, PARAMS).result()[0].text == base_text


def test_an_adapter_peft_builds_itself_serves_beside_base_rows(make_engine, tiny, tmp_path):
    """An adapter with more than plain A and B matrices (per-module ranks) takes PEFT's own paths, base rows too."""
    torch.manual_seed(1)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     rank_pattern={"q_proj": 4}, init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny[0]), cfg).save_pretrained(tmp_path / "ranked")
    engine, ids, base_text, lora_text = canary_beside_the_base(make_engine, tiny, tmp_path / "ranked")
    assert engine._slot_signatures[engine._adapters["v000001"]] is None  # not a plain slot: PEFT's paths
    assert base_text != lora_text
    assert engine.submit(ids, PARAMS).result()[0].text == base_text
    mixed = engine.submit(ids, PARAMS, n=2, route=lambda stable, canary: [stable, canary])
    assert [r.text for r in mixed.result()] == [base_text, lora_text]
    assert engine.submit(ids, PARAMS, route=lambda stable, canary: [canary]).result()[0].text == lora_text


def test_a_route_to_a_version_not_served_is_refused_and_a_dropped_canary_unloads(make_engine, adapter_dir):
    engine = make_engine()
    ids = engine.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match="current or canary"):
        engine.submit(ids, PARAMS, route=lambda stable, canary: ["v000001"])
    engine.load_adapter("v000001", adapter_dir)
    engine.set_canary("v000001")
    assert engine.submit(ids, PARAMS, route=lambda s, c: [c]).result()[0].text
    engine.set_canary("")  # rolled back: unloaded once nothing uses it
    deadline = time.monotonic() + 30
    while engine.loaded_versions() and time.monotonic() < deadline:
        engine.submit(ids, SamplingParams(max_new_tokens=1)).result()  # steps run the unloading
    assert engine.loaded_versions() == [] and engine.canary_version == ""


def test_a_new_version_is_copied_into_a_retired_versions_layers(make_engine, tiny, adapter_dir, tmp_path):
    """The next version of the same LoRA config reuses the layers a retired one left; the text is PEFT's either way."""
    first, other = random_lora(tiny, tmp_path / "first", seed=3), random_lora(tiny, tmp_path / "other", seed=1)
    rank4 = random_lora(tiny, tmp_path / "rank4", seed=2, r=4)
    engine = make_engine()
    ids = engine.encode_prompt(PROMPT)
    texts = {d: greedy_ids(PeftModel.from_pretrained(copy.deepcopy(tiny[0]), d).eval(), tiny[1], ids, 24)
             for d in (first, adapter_dir, other, rank4)}
    assert len(set(texts.values())) == 4  # four different policies
    engine.load_adapter("v000001", first)
    engine.set_current("v000001")
    engine.load_adapter("v000002", other)
    engine.set_current("v000002")
    deadline = time.monotonic() + 30
    while engine.loaded_versions() != ["v000002"]:  # v000001 released: its layers become the free slot
        assert time.monotonic() < deadline, engine.loaded_versions()
        engine.submit(ids, SamplingParams(max_new_tokens=1)).result()
    assert engine.stats["slot_reuses"] == 0
    engine.load_adapter("v000003", adapter_dir)  # into v000001's layers, overwriting `first`
    assert engine.stats["slot_reuses"] == 1
    engine.set_canary("v000003")
    # One request at a time: each batch on one version (PEFT's mixed-adapter path rounds differently, and the
    # tiny random model's near-tied logits would make greedy texts differ for that reason alone).
    assert engine.submit(ids, PARAMS, route=lambda stable, canary: [canary]).result()[0].text == texts[adapter_dir]
    assert engine.submit(ids, PARAMS, route=lambda stable, canary: [stable]).result()[0].text == texts[other]
    engine.set_canary("")
    while engine.loaded_versions() != ["v000002"]:
        assert time.monotonic() < deadline, engine.loaded_versions()
        engine.submit(ids, SamplingParams(max_new_tokens=1)).result()
    engine.load_adapter("v000004", rank4)  # another rank: new layers from PEFT, not the free slot
    assert engine.stats["slot_reuses"] == 1
    engine.set_current("v000004")
    assert engine.submit(ids, PARAMS).result()[0].text == texts[rank4]



def test_a_copied_version_has_the_weights_peft_would_load_under_a_bf16_base(make_engine, tiny, adapter_dir, tmp_path):
    """PEFT keeps LoRA weights in fp32 under a bf16 base; a copy into reused layers keeps the file's values too."""
    from safetensors.torch import load_file

    first = random_lora(tiny, tmp_path / "first", seed=3)
    engine = make_engine(model=copy.deepcopy(tiny[0]).to(torch.bfloat16))
    ids = engine.encode_prompt(PROMPT)
    for k, d in enumerate((first, random_lora(tiny, tmp_path / "other", seed=1)), 1):
        engine.load_adapter(f"v00000{k}", d)
        engine.set_current(f"v00000{k}")
    deadline = time.monotonic() + 30
    while engine.loaded_versions() != ["v000002"]:  # v000001's layers become the free slot
        assert time.monotonic() < deadline, engine.loaded_versions()
        engine.submit(ids, SamplingParams(max_new_tokens=1)).result()
    engine.load_adapter("v000003", adapter_dir)
    assert engine.stats["slot_reuses"] == 1
    slot = engine._adapters["v000003"]
    layers = {n: m for n, m in engine.model.named_modules() if slot in getattr(m, "lora_A", {})}
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(layers) * 2 == len(saved)
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[slot].weight
            assert weight.dtype == torch.float32 and torch.equal(weight, saved[f"{name}.{part}.weight"]), name


def test_rows_of_two_adapter_versions_run_stacked_and_a_reused_slot_is_restacked(make_engine, tiny, adapter_dir,
                                                                                 tmp_path):
    """A swap from one adapter to another: both versions' rows share steps, each with its own policy's greedy tokens.

    They run through lora_mix's stacked pass; when a retired version's layers take the next version,
    the rows on it get the new version's policy (a stale stack would give them the old one).
    """
    first, third = random_lora(tiny, tmp_path / "first", seed=3), random_lora(tiny, tmp_path / "third", seed=1)
    engine = make_engine()
    ids = engine.encode_prompt(PROMPT)
    models = {d: PeftModel.from_pretrained(copy.deepcopy(tiny[0]), d).eval() for d in (first, adapter_dir, third)}
    assert len({greedy_ids(m, tiny[1], ids, 24) for m in models.values()}) == 3  # three different policies
    engine.load_adapter("v000001", first)
    engine.set_current("v000001")
    engine.load_adapter("v000002", adapter_dir)
    slots = sorted(engine._adapters[v] for v in ("v000001", "v000002"))  # the versions' PEFT adapter names
    _, _, got, calls = _two_requests_in_one_batch(engine, ids, lambda: engine.set_current("v000002"))
    _assert_greedy_under(models[first], ids, got[0])
    _assert_greedy_under(models[adapter_dir], ids, got[1])
    assert any(sorted(set(c)) == slots for c in calls), calls  # one forward carried both adapters
    assert engine.stats["stacked_passes"] > 0

    deadline = time.monotonic() + 30
    while engine.loaded_versions() != ["v000002"]:  # v000001's layers become the free slot
        assert time.monotonic() < deadline, engine.loaded_versions()
        engine.submit(ids, SamplingParams(max_new_tokens=1)).result()
    engine._mix = lora_mix.MixedLora(engine._layers(), slots)  # as if stacked just before: the copy must drop it
    engine.load_adapter("v000003", third)  # copied into v000001's layers
    assert engine.stats["slot_reuses"] == 1 and engine._adapters["v000003"] == slots[0]
    assert engine._mix is None
    _, _, got, calls = _two_requests_in_one_batch(engine, ids, lambda: engine.set_current("v000003"))
    _assert_greedy_under(models[adapter_dir], ids, got[0])
    _assert_greedy_under(models[third], ids, got[1])
    assert any(sorted(set(c)) == slots for c in calls), calls
