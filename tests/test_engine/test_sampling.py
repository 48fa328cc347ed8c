"""engine.sampling: each logits stage against transformers' processors, seeded draws, greedy, validation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from moeshard.engine.sampling import (
    GenerationDefaults,
    SamplingParamError,
    SamplingParams,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    sample,
)

B, V = 6, 97
CPU = torch.device("cpu")


def _logits(seed: int = 0, batch: int = B, vocab: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, vocab), generator=gen) * 3


def _same_mask_and_values(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


# --- stages against transformers ---------------------------------------------------------


FILTERS = [  # (our stage, transformers' warper, one value per row, the value that disables the filter)
    (apply_top_k, TopKLogitsWarper, [1, 2, 5, 96, 97, 0], 0),
    (apply_top_p, TopPLogitsWarper, [0.05, 0.3, 0.5, 0.9, 0.999, 1.0], 1.0),
    (apply_min_p, MinPLogitsWarper, [0.0, 0.01, 0.1, 0.3, 0.7, 1.0], 0.0),
]


@pytest.mark.parametrize("ours_fn,warper,values,neutral", FILTERS, ids=["top_k", "top_p", "min_p"])
def test_filter_matches_transformers(ours_fn, warper, values, neutral):
    logits = _logits(len(values) + int(neutral * 10))
    ours = ours_fn(logits, torch.tensor(values))
    for row, value in enumerate(values):
        ref = logits[row: row + 1] if value == neutral else warper(value)(None, logits[row: row + 1].clone())
        _same_mask_and_values(ours[row: row + 1], ref)


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    ours = apply_top_k(logits, torch.tensor([2]))
    _same_mask_and_values(ours, TopKLogitsWarper(2)(None, logits.clone()))


def test_temperature_matches_transformers():
    ts = [0.1, 0.5, 1.0, 1.7, 2.0, 3.5]
    logits = _logits(4)
    ours = apply_temperature(logits, torch.tensor(ts))
    for row, t in enumerate(ts):
        ref = TemperatureLogitsWarper(t)(None, logits[row: row + 1].clone())
        torch.testing.assert_close(ours[row: row + 1], ref)


def test_repetition_penalty_matches_transformers():
    penalties = [0.5, 1.0, 1.3, 2.0, 1.1, 0.9]
    logits = _logits(5)
    gen = torch.Generator().manual_seed(5)
    histories = [torch.randint(0, V, (n,), generator=gen) for n in (1, 4, 9, 0, 30, 3)]
    seen = torch.zeros((B, V), dtype=torch.bool)
    for row, h in enumerate(histories):
        seen[row, h] = True
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    for row, (p, h) in enumerate(zip(penalties, histories)):
        if len(h) == 0:
            torch.testing.assert_close(ours[row], logits[row])
            continue
        ref = RepetitionPenaltyLogitsProcessor(p)(h.unsqueeze(0), logits[row: row + 1].clone())
        torch.testing.assert_close(ours[row: row + 1], ref)


def test_presence_and_frequency_follow_openai_formula():
    logits = torch.zeros((1, 5))
    counts = torch.tensor([[0, 1, 3, 0, 2]])
    out = apply_presence_frequency(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, -1.0]]


def test_sample_chain_draws_only_what_the_transformers_chain_allows():
    """The full chain (rep. penalty -> temperature -> top-k -> top-p -> min-p) equals HF's chain applied in order."""
    logits = _logits(6, batch=1)
    prompt, output = [3, 5, 5], [7, 3]
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2, seed=1)
    history = torch.tensor([prompt + output])
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        ref = proc(history, ref)
    allowed = set(torch.nonzero(~torch.isinf(ref[0])).flatten().tolist())
    draws = set()
    for seed in range(200):
        gen = make_generator(seed, 0, CPU)
        draws.add(int(sample(logits, [params], [gen], [prompt], [output]).tokens[0]))
    assert draws <= allowed
    assert len(draws) > 1 or len(allowed) == 1


# --- drawing -----------------------------------------------------------------------------


def test_greedy_is_exact_argmax_and_ignores_generators():
    logits = _logits(7)
    gens = [make_generator(s, 0, CPU) for s in range(B)]
    before = [g.get_state().clone() for g in gens]
    out = sample(logits, [SamplingParams(temperature=0)] * B, gens, [[]] * B, [[]] * B)
    assert torch.equal(out.tokens, logits.argmax(dim=-1))
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, before))


def test_greedy_applies_penalties_first():
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], [None], [[0]], [[]])
    assert out.tokens.tolist() == [1]


def test_seeded_draws_do_not_depend_on_batch_mix():
    logits = _logits(8, batch=1)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def draw_alone() -> list[int]:
        gen = make_generator(1234, 0, CPU)
        return [int(sample(logits, [params], [gen], [[1]], [[]]).tokens[0]) for _ in range(8)]

    def draw_in_mix() -> list[int]:
        gen = make_generator(1234, 0, CPU)
        others = _logits(9, batch=3)
        batch = torch.cat([others[:2], logits, others[2:]])
        mix = [SamplingParams(temperature=0.8), SamplingParams(temperature=0), params, SamplingParams(seed=7)]
        gens = [None, None, gen, make_generator(7, 0, CPU)]
        return [int(sample(batch, mix, gens, [[1]] * 4, [[]] * 4).tokens[2]) for _ in range(8)]

    alone = draw_alone()
    assert alone == draw_alone()
    assert alone == draw_in_mix()
    assert len(set(alone)) > 1  # a real draw, not a constant


def test_choices_of_one_seed_differ_but_repeat():
    logits = torch.zeros((1, 1000))
    params = [SamplingParams(seed=42)]

    def first_tokens(choice: int) -> list[int]:
        gen = make_generator(42, choice, CPU)
        return [int(sample(logits, params, [gen], [[]], [[]]).tokens[0]) for _ in range(4)]

    assert first_tokens(0) == first_tokens(0)
    assert first_tokens(1) == first_tokens(1)
    assert first_tokens(0) != first_tokens(1)
    assert make_generator(None, 0, CPU) is None


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).repeat(4000, 1)
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams()] * 4000, [None] * 4000, [[]] * 4000, [[]] * 4000)
    freq = torch.bincount(out.tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_logprobs_are_raw_log_softmax():
    logits = _logits(10)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=k) for k in (None, 0, 2, 5, 1, None)]
    out = sample(logits, params, [make_generator(i, 0, CPU) for i in range(B)], [[]] * B, [[]] * B)
    raw = logits.log_softmax(dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.tokens.unsqueeze(1)).squeeze(1))
    assert out.top_ids.shape == out.top_logprobs.shape == (B, 5)
    torch.testing.assert_close(out.top_logprobs, raw.topk(5, dim=-1).values)
    assert out.logprobs.dtype == torch.float32 and out.tokens.dtype == torch.int64
    none = sample(logits, [SamplingParams()] * B, [None] * B, [[]] * B, [[]] * B)
    assert none.top_ids.shape == (B, 0)


def test_sample_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 logits rows but 1 params"):
        sample(_logits(0, batch=2), [SamplingParams()], [None], [[]], [[]])


# --- request validation ------------------------------------------------------------------

DEFAULTS = GenerationDefaults(eos_token_ids=(2,), temperature=0.6, top_p=0.9, top_k=20)


def test_missing_fields_take_checkpoint_defaults():
    params = SamplingParams.from_request({}, DEFAULTS, chat=False)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)
    assert params.logprobs is None and params.seed is None and not params.ignore_eos
    nulls = SamplingParams.from_request({"temperature": None, "top_p": None, "seed": None}, DEFAULTS, chat=True)
    assert nulls.temperature == 0.6 and nulls.seed is None


def test_request_fields_are_read():
    body = {"temperature": 0, "top_p": 0.5, "top_k": -1, "min_p": 0.1, "seed": 3, "repetition_penalty": 1.1,
            "presence_penalty": -1.5, "frequency_penalty": 2, "ignore_eos": True, "logprobs": 3}
    params = SamplingParams.from_request(body, DEFAULTS, chat=False)
    assert params == SamplingParams(temperature=0.0, top_p=0.5, top_k=0, min_p=0.1, seed=3, repetition_penalty=1.1,
                                    presence_penalty=-1.5, frequency_penalty=2.0, logprobs=3, ignore_eos=True)
    assert params.greedy


def test_chat_logprobs_shape():
    assert SamplingParams.from_request({"logprobs": True}, DEFAULTS, chat=True).logprobs == 0
    assert SamplingParams.from_request({"logprobs": True, "top_logprobs": 4}, DEFAULTS, chat=True).logprobs == 4
    assert SamplingParams.from_request({"logprobs": False}, DEFAULTS, chat=True).logprobs is None


BAD_FIELDS = [
    ("temperature", True), ("temperature", "hot"), ("temperature", -0.1), ("temperature", [1]),
    ("temperature", float("nan")),
    ("top_p", False), ("top_p", "0.5"), ("top_p", 0), ("top_p", 1.5), ("top_p", {}),
    ("top_k", True), ("top_k", 2.0), ("top_k", "5"), ("top_k", -2),
    ("min_p", True), ("min_p", "x"), ("min_p", -0.1), ("min_p", 1.1),
    ("seed", True), ("seed", 1.5), ("seed", "7"), ("seed", 2**64),
    ("repetition_penalty", True), ("repetition_penalty", "1"), ("repetition_penalty", 0), ("repetition_penalty", -1),
    ("presence_penalty", False), ("presence_penalty", "0"), ("presence_penalty", 2.5), ("presence_penalty", -3),
    ("frequency_penalty", True), ("frequency_penalty", "a"), ("frequency_penalty", 2.1),
    ("ignore_eos", 1), ("ignore_eos", "true"),
    ("logprobs", True), ("logprobs", 21), ("logprobs", -1), ("logprobs", "2"), ("logprobs", 1.0),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_completions_refuse_bad_field(field, value):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams.from_request({field: value}, DEFAULTS, chat=False)
    assert info.value.field == field
    assert "\n" not in str(info.value) and str(info.value).startswith(field)


@pytest.mark.parametrize("body,field", [
    ({"logprobs": 1}, "logprobs"), ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
])
def test_chat_refuses_bad_logprobs(body, field):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams.from_request(body, DEFAULTS, chat=True)
    assert info.value.field == field


# --- checkpoint defaults -----------------------------------------------------------------


def test_generation_defaults_from_checkpoint_with_eos_list(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8, "top_k": 20, "do_sample": True}))
    defaults = GenerationDefaults.from_checkpoint(tmp_path, fallback_eos=[1])
    assert defaults == GenerationDefaults(eos_token_ids=(151645, 151643), temperature=0.7, top_p=0.8, top_k=20)


def test_generation_defaults_single_eos_and_fallback(tmp_path):
    assert GenerationDefaults.from_checkpoint(tmp_path, fallback_eos=[5]) == GenerationDefaults(eos_token_ids=(5,))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert GenerationDefaults.from_checkpoint(tmp_path, fallback_eos=[5]).eos_token_ids == (9,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": -1}))
    assert GenerationDefaults.from_checkpoint(tmp_path, fallback_eos=[5]) == GenerationDefaults(eos_token_ids=(5,))


@pytest.mark.parametrize("content,key", [
    ({"eos_token_id": "2"}, "eos_token_id"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
])
def test_generation_defaults_refuse_malformed_file(tmp_path, content, key):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=key):
        GenerationDefaults.from_checkpoint(tmp_path, fallback_eos=[])
