"""The GPT's fast paths give the reference paths' outputs: filled-cache decode steps, the fused
sampler, bf16 sampling, the fused AdamW of build_optimizer. No timings here (scripts/benchmark_*)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoregressive.generate import (GuidanceSchedule, apply_guidance, decode_n_tokens, decode_one_token,
                                     draw_uniforms, generate_codes, prefill, reference_decode_one_token,
                                     sample_token, select_token)
from tests.gpt_testing import assert_max_close, random_gpt
from utils.training import OptimConfig, build_optimizer


def _cached_logits(model, labels: torch.Tensor, codes: torch.Tensor, fast: bool) -> torch.Tensor:
    """Logits (B, N, V) of a prefill of 3 positions, then one position per step, with or without ``start``."""
    n = codes.shape[1]
    model.setup_caches(labels.shape[0], n + 1)
    steps = [model.forward_cached(torch.arange(3), codes=codes[:, :2], labels=labels)]
    for i in range(2, n):
        extra = {"start": i + 1} if fast else {}
        steps.append(model.forward_cached(torch.tensor([i + 1]), codes=codes[:, i : i + 1], **extra))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}], ids=["mha", "gqa"])
@torch.no_grad()
def test_filled_cache_steps_give_the_masked_full_cache_logits_bit_for_bit(overrides):
    # 40 positions cross several multiples of 8, where the attended length changes from masked to exact.
    model = random_gpt(seed=3, block_size=40, **overrides)
    labels = torch.tensor([1, 4, 7])
    codes = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    full = _cached_logits(model, labels, codes, fast=False)
    fast = _cached_logits(model, labels, codes, fast=True)
    assert torch.equal(fast, full)
    # And both are the teacher-forcing forward's logits (up to summation order).
    assert_max_close(fast[:, :40], model(codes, labels))


@torch.no_grad()
def test_filled_cache_step_writes_only_its_position():
    model = random_gpt(seed=1)
    labels = torch.tensor([2, 5])
    model.setup_caches(2, 16)
    prefill(model, labels)
    cache = model.layers[0].attention.kv_cache
    before = cache.k_cache.clone()
    model.forward_cached(torch.tensor([1]), codes=torch.tensor([[3], [4]]), start=1)
    changed = (cache.k_cache != before).any(dim=(0, 1, 3))
    assert changed.nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.9),
                                                      (0.0, 0, 1.0)])
def test_fused_sampler_equals_guidance_then_sample_token(guided, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(8 if guided else 4, 50, generator=gen) * 3
    logits[0, :10] = 1.0  # ties
    uniforms = torch.rand(4, generator=gen)
    scale = torch.tensor(2.5)
    original = logits.clone()
    expected = sample_token(apply_guidance(logits, scale) if guided else logits, uniforms, temperature, top_k, top_p)
    got = select_token(logits, uniforms, scale, temperature, top_k, top_p, guided)
    assert torch.equal(got, expected)
    assert torch.equal(logits, original)  # the caller's logits are not modified


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (20, 0.9, 0.8)])
@torch.no_grad()
def test_fast_generation_gives_the_reference_codes(top_k, top_p, temperature):
    model = random_gpt(seed=2, vocab_size=64, block_size=16)
    labels = torch.tensor([0, 3, 9])
    uniforms = draw_uniforms(3, 16, seeds=[1, 2, 3])
    guidance = GuidanceSchedule(1.5, 4.0)
    fast = generate_codes(model, labels, uniforms, guidance=guidance, temperature=temperature, top_k=top_k,
                          top_p=top_p)
    # The reference: the full masked cache and the separate guidance / sampling passes.
    labels_in = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    scales = guidance.scales(16)
    model.setup_caches(6, 16)
    first = sample_token(apply_guidance(prefill(model, labels_in), scales[0]), uniforms[:, 0], temperature, top_k,
                         top_p)
    rest = decode_n_tokens(model, first, 1, scales[1:], uniforms[:, 1:], temperature, top_k, top_p, True,
                           step=reference_decode_one_token)
    assert torch.equal(fast, torch.cat([first[:, None], rest], dim=1))


@torch.no_grad()
def test_decode_one_token_with_and_without_start_agree():
    model = random_gpt(seed=4)
    labels = torch.tensor([1, 2])
    tokens = {}
    for start in (None, 5):
        model.setup_caches(2, 16)
        prefill(model, labels, prefix_codes=torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
        tokens[start] = decode_one_token(model, torch.tensor([[9], [10]]), torch.tensor([5]), torch.tensor(1.0),
                                         torch.tensor([0.3, 0.6]), 1.0, 0, 1.0, False, start=start)
    assert torch.equal(tokens[None], tokens[5])


@torch.no_grad()
def test_bf16_weights_sample_valid_codes_with_a_bf16_cache():
    model = random_gpt(seed=5).to(torch.bfloat16)
    codes = model.generate(torch.tensor([1, 2]), cfg_scale=2.0, seeds=[0, 1])
    assert codes.shape == (2, model.config.block_size) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.config.vocab_size
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
    greedy = model.generate(torch.tensor([1]), temperature=0.0, seeds=[0])
    assert torch.equal(greedy, model.generate(torch.tensor([1]), temperature=0.0, seeds=[9]))  # greedy ignores seeds


def _train(model, optimizer, steps: int = 4) -> None:
    torch.manual_seed(0)  # the label dropout's draws
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        codes = torch.randint(0, model.config.vocab_size, (4, 16), generator=gen)
        labels = torch.randint(0, model.config.num_classes, (4,), generator=gen)
        loss = F.cross_entropy(model(codes, labels).flatten(0, 1), codes.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_fused_adamw_matches_the_per_tensor_loop_on_a_tiny_gpt():
    cfg = OptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    models, optimizers = [], []
    for fused in (True, False):
        model = random_gpt(seed=6, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0).train()
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        assert optimizer.defaults["fused"] is True  # the CPU default
        if not fused:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
        _train(model, optimizer)
        models.append(model)
    for (name, fused), (_, loop) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
