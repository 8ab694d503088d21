"""Per-row sampling and incremental detokenization, on hand-made logits and the real tokenizer."""

from __future__ import annotations

import torch

from rlhf_online.engine.detok import IncrementalText
from rlhf_online.engine.request import SamplingParams
from rlhf_online.engine.sampling import make_generator, sample_rows


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=2.0, top_p=1e-6), SamplingParams(temperature=0.0)]
    gens = [make_generator(i) for i in range(4)]
    assert sample_rows(logits, params, gens) == logits.argmax(-1).tolist()


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(5).indices.tolist())
    gen = make_generator(0)
    picks = {sample_rows(logits, [SamplingParams(temperature=5.0, top_k=5)], [gen])[0] for _ in range(200)}
    assert picks <= allowed and len(picks) > 1


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = make_generator(0)
    picks = [sample_rows(probs.log(), [SamplingParams(temperature=1.0, top_p=0.7)], [gen])[0] for _ in range(300)]
    assert set(picks) == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are cut


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    gen = make_generator(1)
    picks = [sample_rows(probs.log(), [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(3000)]
    freq = [picks.count(i) / len(picks) for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.04 and abs(freq[1] - 0.2) < 0.04 and abs(freq[2] - 0.1) < 0.03


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=1.0)
    alone = [sample_rows(logits[1:2], [p], [make_generator(42)])[0] for _ in range(1)]
    together = sample_rows(logits, [p, p, p], [make_generator(1), make_generator(42), make_generator(3)])
    assert together[1] == alone[0]


def test_deltas_never_split_a_multibyte_character(tiny):
    tok = tiny[1]
    text = "Snow ❄️ and tea 🍵, naïve café."
    ids = tok.encode(text, add_special_tokens=False)
    inc = IncrementalText(tok)
    deltas = []
    for i in ids:
        inc.add(i)
        deltas.append(inc.delta())
    deltas.append(inc.delta(final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_stop_string_across_tokens_is_held_back_then_cut(tiny):
    tok = tiny[1]
    ids = tok.encode("one two three four five", add_special_tokens=False)
    inc = IncrementalText(tok, stop=("three fo",))
    out, stopped = [], False
    for i in ids:
        stopped = inc.add(i)
        out.append(inc.delta(final=stopped))
        if stopped:
            break
    assert stopped
    assert "".join(out) == "one two "


def test_a_character_cut_off_at_the_end_is_dropped(tiny):
    tok = tiny[1]
    ids = tok.encode("tea 🍵", add_special_tokens=False)
    inc = IncrementalText(tok)
    for i in ids[:-1]:  # the emoji's last byte never arrives
        inc.add(i)
    assert inc.text.endswith("\ufffd")
    assert inc.delta(final=True) == "tea "


def test_the_two_level_cdf_picks_what_a_float64_cdf_over_the_whole_vocabulary_picks():
    from rlhf_online.engine.sampling import BLOCK, inverse_cdf

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10 * BLOCK + 37, generator=g) * 4  # a partial last block
    probs = torch.softmax(logits, dim=-1)
    for _ in range(20):
        u = torch.rand(64, generator=g, dtype=torch.float64)
        cdf = probs.double().cumsum(dim=-1)
        expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        assert torch.equal(inverse_cdf(probs, u), expected)


def test_the_two_level_cdf_never_picks_a_token_without_probability():
    from rlhf_online.engine.sampling import BLOCK, inverse_cdf

    probs = torch.zeros(3, 3 * BLOCK)
    probs[:, BLOCK : BLOCK + 5] = 0.2  # all mass in the middle block's first 5 tokens; the rest is filtered out
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-16], dtype=torch.float64)
    picked = inverse_cdf(probs, u).tolist()
    assert all(BLOCK <= p < BLOCK + 5 for p in picked) and picked[1] == BLOCK + 2
