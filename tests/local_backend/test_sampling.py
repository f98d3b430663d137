"""Logit processing on hand-made logits, where the right answer is known."""

from __future__ import annotations

import pytest
import torch

from local_backend.sampling import InvalidParam, Sampler, SamplingParams, sample_batch

CPU = torch.device("cpu")


def sampler(**kw) -> Sampler:
    return Sampler(SamplingParams(max_tokens=8, **kw), prompt_ids=[3], device=CPU)


def test_penalties_and_bias() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 2.9])
    s = sampler(temperature=0.0, repetition_penalty=2.0)
    assert s.sample(logits) == 4  # token 3 is in the prompt: 3.0 / 2 < 2.9
    s = sampler(temperature=0.0, frequency_penalty=1.0)
    s.append(3)
    assert s.sample(logits) == 4
    s = sampler(temperature=0.0, presence_penalty=0.05)
    assert s.sample(logits) == 3  # nothing generated yet
    s = sampler(temperature=0.0, logit_bias={0: 10.0})
    assert s.sample(logits) == 0


def test_truncation_keeps_only_allowed_tokens() -> None:
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0, -2.0])
    for kw in ({"top_k": 2}, {"top_p": 0.6}, {"min_p": 0.5}):
        s = sampler(temperature=1.0, seed=0, **kw)
        seen = {s.sample(logits) for _ in range(200)}
        assert seen <= {0, 1}, kw
        assert len(seen) == 2, kw
    s = sampler(temperature=1.0, seed=0)
    assert len({s.sample(logits) for _ in range(300)}) > 2


def test_batch_fast_path_matches_per_row() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [sampler(temperature=0.0), sampler(temperature=0.0, logit_bias={7: 50.0}), sampler(temperature=0.0)]
    assert sample_batch(logits, rows) == [int(logits[0].argmax()), 7, int(logits[2].argmax())]


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0),
                                         ("logit_bias", {10**9: 1.0}), ("stop", ("",))])
def test_validation_names_the_param(field: str, value) -> None:
    kw = {"max_tokens": 8, field: value}
    with pytest.raises(InvalidParam) as exc:
        SamplingParams(**kw).validate(vocab_size=100)
    assert exc.value.param == field
