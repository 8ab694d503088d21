"""The Generation service on the real SmolLM2: replies are real English, chat and stops behave."""

from __future__ import annotations

import grpc
import pytest

from rlhf_online.config import GenerationSettings
from rlhf_online.store import open_store
from rlhf_online.v1 import generation_pb2 as pb
from rlhf_online.v1 import generation_pb2_grpc as pb_grpc
from services.bootstrap import build_engine
from services.generation import start_generation_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(smollm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    settings = GenerationSettings(port=0, metrics_port=0, host="127.0.0.1", base_model=str(smollm_dir),
                                  data_dir=tmp, store_url=f"sqlite:///{tmp / 'store.db'}")
    running = start_generation_server(settings, build_engine(settings).start(), open_store(settings.store_url))
    yield pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    running.shutdown(5)


def test_greedy_reply_is_english_and_ends_at_eos(stub):
    r = stub.Generate(pb.GenerateRequest(prompt="What is the capital of France? Answer in one sentence.",
                                         params=pb.SamplingParams(max_new_tokens=60)), timeout=120)
    [c] = r.completions
    assert "Paris" in c.text
    assert c.finish_reason == pb.FINISH_REASON_EOS and c.completion_tokens < 60
    assert "<|im_end|>" not in c.text and "<|im_start|>" not in c.text


def test_chat_history_and_stop_string(stub):
    messages = [pb.ChatMessage(role="system", content="You are a grocer."),
                pb.ChatMessage(role="user", content="List three fruits, one per line.")]
    full = stub.Generate(pb.GenerateRequest(messages=messages, params=pb.SamplingParams(max_new_tokens=60)),
                         timeout=120).completions[0]
    assert any(f in full.text.lower() for f in ("apple", "banana", "orange", "grape", "pear", "mango"))
    assert "\n" in full.text.strip()
    stop = "\n"
    cut = stub.Generate(pb.GenerateRequest(messages=messages, params=pb.SamplingParams(max_new_tokens=60, stop=[stop])),
                        timeout=120).completions[0]
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == full.text[: full.text.index(stop)]


def test_stream_matches_unary_with_a_seed(stub):
    req = pb.GenerateRequest(prompt="Describe a rainy day in two sentences.",
                             params=pb.SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=11))
    unary = stub.Generate(req, timeout=120).completions[0].text
    streamed = "".join(c.text_delta for c in stub.GenerateStream(req, timeout=120))
    assert streamed == unary and len(unary.split()) > 5
