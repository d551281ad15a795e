"""The GPT reproduces the official forward passes and greedy generations (golden_tiny.pt, gpt.*)."""

from __future__ import annotations

import pytest
import torch

from autoregressive import load_gpt_from_official
from autoregressive.generate import apply_guidance
from tests.gpt_testing import assert_max_close, load_golden

GOLDEN = load_golden()


@pytest.fixture(scope="module")
def model():
    return load_gpt_from_official(GOLDEN["gpt.state_dict"], GOLDEN["gpt.config"])


def test_rope_table_is_bit_identical(model):
    assert torch.equal(model.rope, GOLDEN["gpt.freqs_cis"])


@torch.no_grad()
def test_teacher_forced_logits(model):
    assert_max_close(model(GOLDEN["gpt.codes"], GOLDEN["gpt.labels"]), GOLDEN["gpt.logits"])


@torch.no_grad()
def test_unconditional_and_guided_logits(model):
    codes, labels = GOLDEN["gpt.codes"], GOLDEN["gpt.labels"]
    null = torch.full_like(labels, model.config.null_class)
    assert_max_close(model(codes, null), GOLDEN["gpt.logits_uncond"])
    both = model(torch.cat([codes, codes]), torch.cat([labels, null]))  # (2B, N, V)
    guided = apply_guidance(both.flatten(1), GOLDEN["gpt.cfg_scale"]).view_as(GOLDEN["gpt.logits_cfg"])
    assert_max_close(guided, GOLDEN["gpt.logits_cfg"])


@torch.no_grad()
def test_kv_cache_logits(model):
    """Prefill the class token, then feed codes 0..14 one at a time, as the reference did."""
    codes, labels = GOLDEN["gpt.codes"], GOLDEN["gpt.labels"]
    n = codes.shape[1]
    model.setup_caches(codes.shape[0], n)
    steps = [model.forward_cached(torch.tensor([0]), labels=labels)]
    steps += [model.forward_cached(torch.tensor([i + 1]), codes=codes[:, i : i + 1]) for i in range(n - 1)]
    cached = torch.cat(steps, dim=1)
    assert_max_close(cached, GOLDEN["gpt.logits_kv"])
    assert_max_close(cached, GOLDEN["gpt.logits"])


@pytest.mark.parametrize("case", GOLDEN["gpt.greedy_cases"], ids=lambda c: c["name"])
def test_greedy_generation(model, case):
    expected = GOLDEN["gpt.greedy"][case["name"]]["codes"]
    codes = model.generate(
        GOLDEN["gpt.labels"],
        cfg_scale=tuple(case["cfg_scale"]) if isinstance(case["cfg_scale"], list) else case["cfg_scale"],
        temperature=case["temperature"],
        top_k=case["top_k"],
        top_p=case["top_p"],
        seeds=[11, 12, 13],
    )
    assert codes.dtype == torch.long
    assert torch.equal(codes, expected)
