"""Generation: fast cached sampler vs a slow reference, per-sample seeds, prefixes, filters, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from autoregressive.generate import (
    GuidanceSchedule,
    apply_guidance,
    compiled_decode_one_token,
    decode_n_tokens,
    decode_one_token,
    draw_uniforms,
    filter_logits,
    generate_codes,
    iter_codes,
    prefill,
    sample_token,
)
from tests.gpt_testing import random_gpt

NEG = -math.inf


# ------------------------------------------------------------------------------------------------
# Guidance schedule
# ------------------------------------------------------------------------------------------------
def test_schedule_from_value():
    # Parsing "1.2,8.0" is the command line's job: tests/test_sampling_options.py tests it there.
    assert GuidanceSchedule.from_value((1.5, 4.0)) == GuidanceSchedule(1.5, 4.0)
    assert GuidanceSchedule.from_value(3) == GuidanceSchedule(3.0)
    with pytest.raises(TypeError):
        GuidanceSchedule.from_value(True)


def test_schedule_values_and_official_quirk():
    torch.testing.assert_close(GuidanceSchedule(1.2, 8.0).scales(5), torch.linspace(1.2, 8.0, 5))
    torch.testing.assert_close(GuidanceSchedule(4.0).scales(3), torch.full((3,), 4.0))
    assert GuidanceSchedule(1.0, 3.0).scales(16)[0].item() == pytest.approx(1.001)
    assert GuidanceSchedule(1.0, 3.0, official_start_quirk=False).scales(16)[0].item() == 1.0
    assert GuidanceSchedule(1.0, 1.0).scales(4).eq(1.0).all()


def test_schedule_enabled():
    assert not GuidanceSchedule(1.0).enabled
    assert GuidanceSchedule(1.0, 3.0).enabled
    # The official sampler switched guidance off here because the first entry is < 1.
    assert GuidanceSchedule(0.5, 3.0).enabled


# ------------------------------------------------------------------------------------------------
# Filters and token choice
# ------------------------------------------------------------------------------------------------
def test_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]])
    assert filter_logits(logits, top_k=2).tolist() == [[NEG, 3.0, 3.0, NEG, NEG]]
    assert filter_logits(logits, top_k=1).tolist() == [[NEG, 3.0, 3.0, NEG, NEG]]
    assert filter_logits(logits, top_k=3).tolist() == [[NEG, 3.0, 3.0, NEG, 2.0]]
    assert torch.equal(filter_logits(logits, top_k=99), logits)


def test_top_p_shifted_cut():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.6) == [False, True, False, True]  # 0.5 stays below, 0.8 crosses and stays
    assert kept(0.9) == [True, True, False, True]
    assert kept(0.4) == [False, True, False, False]  # the best token always stays
    assert kept(1e-6) == [False, True, False, False]
    assert kept(1.0) == [True, True, True, True]


def test_top_k_then_top_p():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    # top-k=3 renormalises over {0.5, 0.3, 0.15}: cumulative 0.526, 0.842, 1 → p=0.8 keeps two.
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=0.8))[0].tolist()
    assert kept == [False, True, False, True]


def test_inverse_cdf_choice():
    logits = torch.tensor([0.25, 0.25, 0.0, 0.5]).log().expand(6, -1)
    uniforms = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.6, 1 - 2**-24])
    assert sample_token(logits, uniforms).tolist() == [0, 0, 1, 3, 3, 3]


def test_greedy_settings_give_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 100) * 3
    uniforms = torch.rand(64)
    argmax = logits.argmax(-1)
    assert torch.equal(sample_token(logits, uniforms, top_k=1), argmax)
    assert torch.equal(sample_token(logits, uniforms, temperature=0.0), argmax)
    assert torch.equal(sample_token(logits, uniforms, top_p=1e-9), argmax)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 200_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens = sample_token(probs.log().expand(n, -1), uniforms)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, probs, rtol=0, atol=5e-3)
    # Temperature 2 flattens: p ∝ sqrt(probs).
    tokens = sample_token(probs.log().expand(n, -1), uniforms, temperature=2.0)
    flat = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(torch.bincount(tokens, minlength=4).float() / n, flat, rtol=0, atol=5e-3)


def test_draw_uniforms():
    per_seed = draw_uniforms(3, 7, seeds=[5, 6, 7])
    assert per_seed.shape == (3, 7)
    assert torch.equal(draw_uniforms(1, 7, seeds=torch.tensor([6]))[0], per_seed[1])
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    assert torch.equal(draw_uniforms(3, 7, generators=gens), per_seed)
    with pytest.raises(ValueError, match="at most one"):
        draw_uniforms(3, 7, seeds=[1, 2, 3], generator=torch.Generator())
    with pytest.raises(ValueError, match="2 seeds"):
        draw_uniforms(3, 7, seeds=[1, 2])


# ------------------------------------------------------------------------------------------------
# Full generation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_sample(model, labels, uniforms, schedule, temperature=1.0, top_k=0, top_p=1.0, prefix=None):
    """Slow reference: no cache, full teacher-forced forward per token, guidance on separate passes."""
    batch, n = uniforms.shape
    scales = schedule.scales(n)
    codes = torch.zeros(batch, 0, dtype=torch.long) if prefix is None else prefix.clone()
    null = torch.full_like(labels, model.config.null_class)
    while codes.shape[1] < n:
        i = codes.shape[1]
        padded = torch.cat([codes, torch.zeros(batch, 1, dtype=torch.long)], dim=1)  # last code is never read
        logits = model(padded, labels)[:, i]
        if schedule.enabled:
            logits = apply_guidance(torch.cat([logits, model(padded, null)[:, i]]), scales[i])
        nxt = sample_token(logits, uniforms[:, i], temperature, top_k, top_p)
        codes = torch.cat([codes, nxt[:, None]], dim=1)
    return codes


@pytest.fixture(scope="module")
def model():
    return random_gpt(seed=3)


@pytest.mark.parametrize("schedule", [GuidanceSchedule(1.0), GuidanceSchedule(2.5), GuidanceSchedule(1.0, 4.0)],
                         ids=["nocfg", "cfg2.5", "cfg1to4"])
@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (10, 0.9, 0.7)])
def test_cached_sampler_matches_reference(model, schedule, top_k, top_p, temperature):
    labels = torch.tensor([0, 4, 9, 10])
    uniforms = draw_uniforms(4, 16, seeds=[1, 2, 3, 4])
    fast = generate_codes(model, labels, uniforms, guidance=schedule, temperature=temperature, top_k=top_k, top_p=top_p)
    slow = reference_sample(model, labels, uniforms, schedule, temperature, top_k, top_p)
    assert torch.equal(fast, slow)


def test_cfg_one_equals_conditional_sampling(model):
    labels = torch.tensor([1, 2, 3])
    seeds = [7, 8, 9]
    guided_off = model.generate(labels, cfg_scale=1.0, seeds=seeds)
    conditional = reference_sample(model, labels, draw_uniforms(3, 16, seeds=seeds), GuidanceSchedule(1.0))
    assert torch.equal(guided_off, conditional)
    assert not torch.equal(model.generate(labels, cfg_scale=3.0, seeds=seeds), guided_off)


@pytest.mark.parametrize("cfg", [1.0, (1.2, 6.0)])
def test_batch_invariance(model, cfg):
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    seeds = torch.arange(100, 108)
    batch = model.generate(labels, cfg_scale=cfg, seeds=seeds)
    for j in (0, 5):
        alone = model.generate(labels[j : j + 1], cfg_scale=cfg, seeds=seeds[j : j + 1])
        assert torch.equal(alone[0], batch[j])
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    shuffled = model.generate(labels[order], cfg_scale=cfg, seeds=seeds[order])
    assert torch.equal(shuffled, batch[order])
    # Distinct seeds really give distinct samples (the test above is not trivially satisfied).
    assert len({tuple(row.tolist()) for row in batch}) == 8


def test_prefix_codes_kept_verbatim(model):
    labels = torch.tensor([2, 5, 7])
    seeds = [1, 2, 3]
    cfg = (1.5, 4.0)
    free = model.generate(labels, cfg_scale=cfg, seeds=seeds)
    # Forcing a run's own first 6 codes changes nothing: same uniforms and scales at the same positions.
    assert torch.equal(model.generate(labels, cfg_scale=cfg, seeds=seeds, prefix_codes=free[:, :6]), free)
    prefix = torch.tensor([5, 6, 7, 8, 9])
    forced = model.generate(labels, cfg_scale=cfg, seeds=seeds, prefix_codes=prefix)
    assert torch.equal(forced[:, :5], prefix.expand(3, -1))
    slow = reference_sample(model, labels, draw_uniforms(3, 16, seeds=seeds), GuidanceSchedule(*cfg),
                            prefix=prefix.expand(3, -1))
    assert torch.equal(forced, slow)
    full = torch.randint(0, 64, (3, 16))
    assert torch.equal(model.generate(labels, seeds=seeds, prefix_codes=full), full)


def test_generation_errors(model):
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="longer"):
        model.generate(labels, prefix_codes=torch.zeros(17, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_codes must be in"):
        model.generate(labels, prefix_codes=torch.tensor([64]))
    with pytest.raises(ValueError, match="labels must be in"):
        model.generate(torch.tensor([11]))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(labels, top_p=0.0)
    with pytest.raises(ValueError, match="codes"):
        model.generate(labels, num_tokens=17)
    no_null = random_gpt(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        no_null.generate(labels, cfg_scale=2.0)
    with pytest.raises(RuntimeError, match="eval"):
        random_gpt().train().generate(labels)


def test_shorter_generation_and_gqa():
    gqa = random_gpt(seed=5, n_kv_head=1)
    labels = torch.tensor([0, 1, 2])
    uniforms = draw_uniforms(3, 9, seeds=[4, 5, 6])
    fast = generate_codes(gqa, labels, uniforms, guidance=GuidanceSchedule(1.5, 3.0))
    assert fast.shape == (3, 9)
    assert torch.equal(fast, reference_sample(gqa, labels, uniforms, GuidanceSchedule(1.5, 3.0)))


def test_bfloat16_model_generates():
    model = random_gpt(seed=1).to(torch.bfloat16)
    codes = model.generate(torch.tensor([1, 2]), cfg_scale=2.0, seeds=[0, 1])
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
    assert int(codes.min()) >= 0 and int(codes.max()) < 64


def test_single_generator_and_global_rng(model):
    labels = torch.tensor([1, 2])
    a = model.generate(labels, generator=torch.Generator().manual_seed(0))
    b = model.generate(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = model.generate(labels)
    torch.manual_seed(1)
    assert torch.equal(model.generate(labels), c)


def test_decode_step_compiles_as_one_graph(model):
    """fullgraph capture of the hot step (the eager backend keeps this test fast on CPU)."""
    step = torch.compile(decode_one_token, backend="eager", fullgraph=True)
    labels = torch.tensor([1, 2])
    uniforms = draw_uniforms(2, 16, seeds=[3, 4])
    schedule = GuidanceSchedule(1.2, 4.0)
    expected = generate_codes(model, labels, uniforms, guidance=schedule)
    labels_in = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    model.setup_caches(4, 16)
    scales = schedule.scales(16)
    first = sample_token(apply_guidance(prefill(model, labels_in), scales[0]), uniforms[:, 0])
    rest = decode_n_tokens(model, first, 1, scales[1:], uniforms[:, 1:], 1.0, 0, 1.0, True, step=step)
    assert torch.equal(torch.cat([first[:, None], rest], dim=1), expected)


@pytest.mark.parametrize("split", [False, True])
def test_compiled_decode_step_matches_eager(model, split):
    """Both shapes of the compiled step (whole step; CUDA's compiled logits + eager sampler) give the eager codes."""
    step = compiled_decode_one_token("cpu", split=split, backend="eager")
    assert compiled_decode_one_token("cpu", split=split, backend="eager") is step  # cached
    labels = torch.tensor([1, 2])
    uniforms = draw_uniforms(2, 16, seeds=[5, 6])
    schedule = GuidanceSchedule(1.2, 4.0)
    expected = generate_codes(model, labels, uniforms, guidance=schedule, top_k=20, top_p=0.9)
    labels_in = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    model.setup_caches(4, 16)
    scales = schedule.scales(16)
    first = sample_token(apply_guidance(prefill(model, labels_in), scales[0]), uniforms[:, 0], 1.0, 20, 0.9)
    rest = decode_n_tokens(model, first, 1, scales[1:], uniforms[:, 1:], 1.0, 20, 0.9, True, step=step)
    assert torch.equal(torch.cat([first[:, None], rest], dim=1), expected)


def test_streamed_codes_equal_collected(model):
    labels = torch.tensor([4, 8])
    uniforms = draw_uniforms(2, 16, seeds=[1, 2])
    prefix = torch.tensor([3, 1, 4])
    stream = iter_codes(model, labels, uniforms, guidance=GuidanceSchedule(2.0), prefix_codes=prefix)
    columns = []
    for column in stream:
        # Between yields the caller's own grad mode is back in force.
        assert torch.is_grad_enabled()
        columns.append(column)
    collected = generate_codes(model, labels, uniforms, guidance=GuidanceSchedule(2.0), prefix_codes=prefix)
    assert torch.equal(torch.stack(columns, dim=1), collected)
    # Bad arguments fail at the call, before any iteration.
    with pytest.raises(ValueError, match="top_k"):
        iter_codes(model, labels, uniforms, top_k=-1)
