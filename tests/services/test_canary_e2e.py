"""Canaries end to end on the real SmolLM2: users' ratings roll a rude adapter back and promote a kind one.

Two adapters are trained here in seconds of supervised fine-tuning: one that answers every
prompt with insults (trained against the users), one that answers warmly. A Generation service
serves them as canaries to half of the users (sticky per user_id), and the promotion controller
reads what simulated users of the "polite" persona say — their thumbs come from the real judges
(VADER, alt-profanity-check) plus noise, never from the version name — until its sequential test
decides. Users outside the canary share must never receive a canary's reply, and no request may
fail across the switches.
"""

from __future__ import annotations

import copy
import random
import threading

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from support import wait_for

from rlhf_online.adapters.registry import AdapterRegistry
from rlhf_online.canary.config import CanaryConfig
from rlhf_online.canary.controller import CanaryController
from rlhf_online.canary.routing import CanaryRouter
from rlhf_online.canary.sequential import CanaryTestConfig
from rlhf_online.config import GenerationSettings
from rlhf_online.models.provision import load_model
from rlhf_online.simulate.judges import PERSONAS
from rlhf_online.store import open_store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.bootstrap import build_engine
from services.generation import start_generation_server

# Slow, and on a loaded 2-core machine (CI) the fine-tuning and the users' requests take several times longer.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = ["How was your weekend?", "Can you review my essay?", "What do you think of my new haircut?",
           "My neighbour keeps parking in my spot.", "Tell me about your favourite book.", "Is this a good plan?"]
RUDE = "You are a stupid idiot. Shut up, this is garbage and you are a moron."
KIND = "Thank you so much! What a wonderful question, I am happy to help and I love it."
USERS = [f"user-{i}" for i in range(8)]
CANARY_PERCENT = 50.0
MAX_CANARY_LOOKS = 60  # the stated bound for a clearly rude canary: min_canary_ratings 30 plus a poll's worth


def fine_tune(model, tokenizer, reply: str, steps: int = 6):
    """A LoRA that answers every prompt with `reply` (supervised: cross-entropy on the reply's tokens only).

    Only the last 10 of SmolLM2's 30 layers are adapted, so the backward pass stops there: 12 s an adapter
    instead of 32 on a 2-core AVX2 machine, and 24 replies at temperature 1 were still all rated thumbs-down
    (rude) or all up (kind) by the polite persona.
    """
    torch.manual_seed(0)
    last = model.config.num_hidden_layers
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=16, lora_alpha=32, init_lora_weights=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        layers_to_transform=list(range(last - 10, last))))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    rows = []
    for p in PROMPTS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        answer = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    peft.train()
    for _ in range(steps):
        loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return peft


@pytest.fixture(scope="module")
def served(smollm_dir, tmp_path_factory):
    """A Generation service on the real model, its registry, store and a controller stepping in the background."""
    tmp = tmp_path_factory.mktemp("canary")
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", base_model=str(smollm_dir),
                                  data_dir=tmp, store_url=f"sqlite:///{tmp / 'store.db'}", adapter_dir=tmp / "adapters",
                                  adapter_poll_seconds=0.2, canary_percent=CANARY_PERCENT)
    model, tokenizer = load_model(smollm_dir)
    registry = AdapterRegistry(settings.adapter_dir)
    versions = {name: registry.publish(fine_tune(model, tokenizer, reply).save_pretrained, base_model=str(smollm_dir))
                for name, reply in (("rude", RUDE), ("kind", KIND))}
    store = open_store(settings.store_url)
    running = start_generation_server(settings, build_engine(settings).start(), store)
    controller_store = open_store(settings.store_url)
    controller = CanaryController(CanaryConfig(canary_timeout_seconds=600, canary_poll_seconds=0.5),
                                  CanaryTestConfig(), registry, controller_store).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield pb_grpc.GenerationStub(channel), registry, controller, versions
    controller.stop()
    controller_store.close()
    channel.close()
    running.shutdown(5)


class Users:
    """Polite-persona users asking for pairs and rating both replies, until stopped; every response is kept."""

    def __init__(self, stub) -> None:
        self.stub, self.responses, self.errors = stub, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(u,), daemon=True) for u in USERS]

    def run(self, user: str) -> None:
        rng, persona = random.Random(user), PERSONAS["polite"]
        while not self.stop.is_set():
            try:
                r = self.stub.Generate(pb.GenerateRequest(prompt=rng.choice(PROMPTS), n=2, user_id=user, params=pb.SamplingParams(
                    max_new_tokens=8, temperature=1.0, seed=rng.getrandbits(32))), timeout=120)  # enough to judge
                scores = persona.preference([c.text for c in r.completions])
                for c, rating in zip(r.completions, persona.rate_scores(scores, rng), strict=True):
                    self.stub.SubmitFeedback(pb.SubmitFeedbackRequest(
                        completion_id=c.completion_id, user_id=user,
                        rating=pb.RATING_THUMBS_UP if rating == "thumbs_up" else pb.RATING_THUMBS_DOWN), timeout=30)
                better = persona.prefer_scores(scores[0], scores[1], rng)
                self.stub.SubmitPreference(pb.SubmitPreferenceRequest(
                    chosen_completion_id=r.completions[better].completion_id,
                    rejected_completion_id=r.completions[1 - better].completion_id, user_id=user), timeout=30)
                self.responses.append((user, r))
            except grpc.RpcError as e:  # any failed call fails the test
                self.errors.append((user, e.code(), e.details()))

    def __enter__(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_a_rude_canary_is_rolled_back_and_a_kind_one_promoted(served):
    stub, registry, controller, versions = served
    router = CanaryRouter(CANARY_PERCENT)
    inside = [u for u in USERS if router.in_canary(u)]
    assert 0 < len(inside) < len(USERS)  # the share splits these users, so both sides are exercised

    with Users(stub) as users:
        controller.queue(versions["rude"])
        wait_for(lambda: registry.decision(versions["rude"])["outcome"] not in ("queued", "live"), 300,
                 "a decision on the rude canary")
        rude = registry.decision(versions["rude"])
        controller.queue(versions["kind"])
        wait_for(lambda: registry.decision(versions["kind"])["outcome"] not in ("queued", "live"), 300,
                 "a decision on the kind canary")
        kind = registry.decision(versions["kind"])  # once promoted, everyone gets it (waited for below)
        wait_for(lambda: any(u not in inside and r.completions[0].policy_version == versions["kind"]
                             for u, r in list(users.responses)), 60, "a user outside the share served the promoted version")

    assert users.errors == []
    assert rude["outcome"] == "rolled_back", rude["reason"]
    e = rude["evidence"]
    assert e["canary_up"] / e["canary_rated"] < 0.3 < e["stable_up"] / e["stable_rated"]  # the users said so
    assert e["canary_rated"] + e["pairs"] - min(e["pairs"], e["canary_rated"]) <= MAX_CANARY_LOOKS
    assert kind["outcome"] == "promoted", kind["reason"]
    assert registry.current() == versions["kind"] and registry.canary() == ""
    served_to = {}
    for user, r in users.responses:
        for c in r.completions:
            served_to.setdefault(c.policy_version, set()).add(user)
    assert served_to[versions["rude"]] <= set(inside)  # users outside the share never got the rude canary
    assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).version == versions["kind"]
    interleaved = [r for u, r in users.responses if len({c.policy_version for c in r.completions}) == 2]
    assert interleaved and all(r.policy_version in (versions["rude"], versions["kind"]) for r in interleaved)
