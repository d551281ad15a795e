"""Behaviour of the tokenizer on the tiny preset: previews, sampler API, training forward, STE, VQ mask."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tokenizer import TOKENIZER_PRESETS, DARTokenizer, SequentialSampler
from tokenizer.config import load_tokenizer_config
from tokenizer.flow import GroupSchedule, flow_loss, warp_time
from tokenizer.modules import GatedBlock


REPO = Path(__file__).resolve().parents[1]


def random_tokenizer(seed: int = 0, **changes) -> DARTokenizer:
    """Tiny tokenizer with every float tensor random: the official init zeroes gates and the output
    projection, which would make the velocity zero and every gradient test vacuous."""
    config = dataclasses.replace(TOKENIZER_PRESETS["tiny"], **changes)
    model = DARTokenizer(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DARTokenizer:
    return random_tokenizer()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_shapes_and_no_global_rng_side_effect(model: DARTokenizer) -> None:
    state = torch.get_rng_state()
    codes = model.encode(images())
    assert torch.equal(state, torch.get_rng_state())  # the reference draws torch.rand(B) here; we must not
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < model.config.vq_codebook_size


def test_preview_after_k_groups_ignores_later_codes(model: DARTokenizer) -> None:
    codes = model.encode(images())
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    changed = codes.clone()
    changed[:, 8:] = (codes[:, 8:] + 1) % model.config.vq_codebook_size  # groups 2 and 3 of 4
    a, b = model.previews(codes, noise=noise), model.previews(changed, noise=noise)
    for k in range(2):  # steps 0, 1 read tokens [0, 8) only
        assert model.schedule.window(k)[1] <= 8
        assert torch.equal(a[k], b[k])
    assert not torch.allclose(a[-1], b[-1])  # the change is visible once its group is decoded


def test_previews_agree_with_decode(model: DARTokenizer) -> None:
    codes = model.encode(images())
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    previews = model.previews(codes, noise=noise)
    assert len(previews) == model.config.num_denoising_steps
    assert torch.equal(previews[-1], model.decode(codes, noise=noise))
    euler = model.previews(codes, noise=noise, sampler="euler", steps=2)
    assert len(euler) == 2 and torch.equal(euler[-1], model.decode(codes, noise=noise, sampler="euler", steps=2))
    for k in range(1, len(previews) + 1):
        # decode(steps=k) runs the causal code decoder on the prefix it needs only; a shorter matmul
        # may round differently in the last bit, hence a float tolerance instead of equality.
        torch.testing.assert_close(previews[k - 1], model.decode(codes, noise=noise, steps=k), rtol=1e-5, atol=1e-4)


def test_decode_accepts_a_prefix_and_rejects_too_short_codes(model: DARTokenizer) -> None:
    codes = model.encode(images())
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        model.decode(codes[:, :4], noise=noise, steps=1), model.decode(codes, noise=noise, steps=1), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="need the first"):
        model.decode(codes[:, :4], noise=noise, steps=2)
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(codes + model.config.vq_codebook_size, noise=noise)


def test_euler_sampler_differs_from_adams2(model: DARTokenizer) -> None:
    codes = model.encode(images())
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    euler = model.decode(codes, noise=noise, sampler="euler")
    assert euler.shape == (2, 3, 32, 32)
    assert not torch.allclose(euler, model.decode(codes, noise=noise))
    with pytest.raises(ValueError, match="unknown sampler"):
        model.decode(codes, noise=noise, sampler="heun")


def test_sequential_sampler_update_rules() -> None:
    """Hand-checked Adams–Bashforth-2 on a velocity field that returns a known sequence."""
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    velocities = iter([torch.full((1, 1), 2.0), torch.full((1, 1), 4.0)])
    sampler = SequentialSampler(torch.zeros(1, 1), sigmas, method="adams2")
    x, preview = sampler.step(lambda x, t: next(velocities))
    assert x.item() == pytest.approx(0.5) and preview.item() == pytest.approx(2.0)
    x, preview = sampler.step(lambda x, t: next(velocities))
    u = 1.5 * 4.0 - 0.5 * 2.0
    assert x.item() == pytest.approx(0.5 + 0.75 * u) and preview.item() == pytest.approx(x.item())
    assert sampler.done
    with pytest.raises(RuntimeError):
        sampler.step(lambda x, t: x)


def test_sampler_step_streams_from_a_growing_prefix(model: DARTokenizer) -> None:
    codes = model.encode(images())
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    reference = model.previews(codes, noise=noise)
    with torch.no_grad():
        state = model.start_sampler(2, noise=noise)
        for k in range(model.config.num_denoising_steps):
            available = model.schedule.window(k)[1]
            preview = model.sampler_step(state, model.cond_from_codes(codes[:, :available]))
            torch.testing.assert_close(preview, reference[k], rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match="needs condition tokens"):
            model.sampler_step(model.start_sampler(2, noise=noise), model.cond_from_codes(codes[:, :2]))


def test_group_schedule_clips_overlapping_windows() -> None:
    schedule = GroupSchedule(num_steps=4, num_groups=4, num_tokens=16, tokens_per_step=8, time_shift=2.0)
    assert [schedule.window(i) for i in range(4)] == [(0, 8), (4, 12), (8, 16), (8, 16)]
    u = torch.tensor([0.0, 0.12, 0.13, 0.5, 0.99])
    assert schedule.training_window_starts(u).tolist() == [0, 0, 4, 8, 8]
    sigmas = schedule.sigmas()
    assert torch.allclose(sigmas, warp_time(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), 2.0))


@pytest.mark.parametrize(("groups", "tokens", "per_step"), [(4, 16, 4), (4, 16, 8), (8, 256, 32)])
def test_group_balanced_times_give_every_window_the_same_share(groups: int, tokens: int, per_step: int) -> None:
    schedule = GroupSchedule(num_steps=groups, num_groups=groups, num_tokens=tokens, tokens_per_step=per_step,
                             time_shift=2.0)
    intervals = schedule.window_intervals()
    # The intervals tile [0, 1) and each one trains a single window, distinct from its neighbours'.
    assert intervals[0][0] == 0.0 and intervals[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
    starts = [schedule.training_window_starts(torch.tensor([(a + b) / 2])).item() for a, b in intervals]
    assert starts == sorted(set(starts))
    # Under uniform u the first window gets half a middle window's share; balanced, r in [j/J, (j+1)/J)
    # lands in window j, uniformly inside its interval, and the map is monotone.
    count = len(intervals)
    r = (torch.arange(count * 50) + 0.5) / (count * 50)
    u = schedule.group_balanced_times(r)
    assert torch.all(u[1:] >= u[:-1]) and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    got = schedule.training_window_starts(u).view(count, 50)
    assert torch.equal(got, torch.tensor(starts)[:, None].expand(count, 50))
    for j, (a, b) in enumerate(intervals):
        torch.testing.assert_close(u.view(count, 50)[j], a + (b - a) * (r.view(count, 50)[j] * count - j))
    uniform_share = torch.bincount(schedule.training_window_starts(r), minlength=tokens)[starts].float()
    assert 2 * uniform_share[0] == pytest.approx(uniform_share[1].item(), abs=2)


def test_group_balanced_training_forward_only_remaps_the_uniform_draws(model: DARTokenizer) -> None:
    plain = model(images(), generator=torch.Generator().manual_seed(3))
    balanced = model(images(), generator=torch.Generator().manual_seed(3), time_sampling="group_balanced")
    torch.testing.assert_close(balanced.u, model.schedule.group_balanced_times(plain.u))
    assert torch.equal(balanced.window_start, model.schedule.training_window_starts(balanced.u))
    with pytest.raises(ValueError, match="time_sampling"):
        model(images(), time_sampling="logit_normal")


def test_training_forward_outputs(model: DARTokenizer) -> None:
    model.train()
    try:
        out = model(images(), generator=torch.Generator().manual_seed(7))
    finally:
        model.eval()
    c = model.config
    assert set(out.losses) == {"flow", "codebook", "commitment"}
    assert out.codes.shape == (2, c.num_all_queries)
    assert torch.equal(out.codes, model.encode(images()))
    assert out.velocity.shape == out.target.shape == out.x_t.shape == out.clean_image.shape == (2, 3, 32, 32)
    assert torch.equal(out.t, warp_time(out.u, c.diff_decoder.time_shift))
    assert torch.equal(out.window_start, model.schedule.training_window_starts(out.u))
    assert torch.equal(out.prefix_len, out.window_start + c.queries_per_step)
    grid = c.diff_decoder.repa_pool_grid
    assert out.repa.shape == (2, grid * grid, c.diff_decoder.repa_out_dim)
    assert torch.allclose(out.losses["flow"], flow_loss(out.velocity, out.target, 0.6)["flow"])
    t = out.t.view(-1, 1, 1, 1)
    assert torch.allclose(out.clean_image, (out.x_t + (1 - t) * out.velocity) / 0.6)
    # x_t lies on the path between the noise and the scaled image: the clean estimate from the
    # *target* velocity recovers the image exactly.
    assert torch.allclose((out.x_t + (1 - t) * out.target) / 0.6, images(), atol=1e-5)


def test_training_forward_is_reproducible_with_a_generator(model: DARTokenizer) -> None:
    a = model(images(), generator=torch.Generator().manual_seed(8))
    b = model(images(), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.u, b.u) and torch.equal(a.velocity, b.velocity)


def test_training_forward_draws_the_same_random_numbers_as_the_paper_objective(model: DARTokenizer) -> None:
    # The paper's forward: u ~ U(0, 1) per image then x0 ~ N(0, I), from the same generator.
    out = model(images(), generator=torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(8)
    u = torch.rand(2, generator=generator)
    x0 = torch.randn(2, 3, 32, 32, generator=generator)
    assert torch.equal(out.u, u)
    t = warp_time(u, 2.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.x_t, t * images() * 0.6 + (1 - t) * x0)


def test_straight_through_gradients_reach_the_encoder(model: DARTokenizer) -> None:
    model.zero_grad()
    out = model(images(), generator=torch.Generator().manual_seed(9))
    out.losses["flow"].backward()
    encoder_side = ("patchify.weight", "encoder_layers.0.attention.q.weight", "quant_in_conv.weight", "query_linear.weight")
    for name in encoder_side:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The flow loss reaches the codebook only through the commitment/codebook terms, not the STE.
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0
    model.zero_grad()


def test_vq_losses_cover_exactly_the_trained_prefix(model: DARTokenizer) -> None:
    quantizer = model.quantize
    z = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(10))
    _, z_norm, z_q = quantizer(z.requires_grad_())
    prefix = torch.tensor([4, 16, 8])
    losses = quantizer.losses(z_norm, z_q, prefix)
    mask = torch.arange(16)[None] < prefix[:, None]
    per_token = (z_q - z_norm).pow(2).mean(-1).detach()
    assert torch.allclose(losses["codebook"], per_token[mask].mean())
    assert torch.allclose(losses["commitment"], 0.25 * per_token[mask].mean())
    losses["commitment"].backward()
    touched = z.grad.abs().sum(-1) > 0  # (B, N)
    assert torch.equal(touched, mask)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain = random_tokenizer(seed=11).train()
    ckpt_cfg = dataclasses.replace(
        plain.config, grad_checkpointing=True,
        diff_decoder=dataclasses.replace(plain.config.diff_decoder, grad_checkpointing=True),
    )
    ckpt = DARTokenizer(ckpt_cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for m in (plain, ckpt):
        out = m(images(), generator=torch.Generator().manual_seed(12))
        sum(out.losses.values()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_inference_caches_rope_tables_and_masks(model: DARTokenizer) -> None:
    model.encode(images())
    mask = model._encoder_mask(4, torch.device("cpu"))
    rope = model.rope(2, 2, torch.device("cpu"), extra=16)
    model.encode(images(seed=3))
    assert model._encoder_mask(4, torch.device("cpu")) is mask
    assert model.rope(2, 2, torch.device("cpu"), extra=16) is rope
    # Query tokens carry no position: identity rotation rows after the 2x2 patch grid.
    cos, sin = rope
    assert torch.equal(cos[4:], torch.ones_like(cos[4:])) and torch.equal(sin[4:], torch.zeros_like(sin[4:]))
    # Patch j sees every patch and no query; query i sees every patch and queries <= i.
    assert mask[:4, :4].all() and not mask[:4, 4:].any()
    assert torch.equal(mask[4:, 4:], torch.ones(16, 16, dtype=torch.bool).tril()) and mask[4:, :4].all()


def test_bad_inputs_raise_clear_errors(model: DARTokenizer) -> None:
    with pytest.raises(ValueError, match="multiple of"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="noise must be"):
        model.decode(torch.zeros(2, 16, dtype=torch.long), noise=torch.zeros(3, 3, 32, 32))
    with pytest.raises(ValueError, match="steps must be"):
        model.decode(torch.zeros(2, 16, dtype=torch.long), steps=5)



def test_fresh_init_follows_the_official_recipe() -> None:
    """Unit-norm codebook rows (normalised after the uniform fill) and normal(0.02), zero-bias linears in the
    encoder / code-decoder blocks. Both matter for training: rows of norm ~1/K get ~K× the gradient of the rest
    of the model, and PyTorch's default Linear init is about 3× wider at the demo width (96)."""
    torch.manual_seed(0)
    model = DARTokenizer(load_tokenizer_config(REPO / "configs" / "tokenizer" / "demo.yaml"))
    rows = model.quantize.embedding.weight
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(rows.shape[0]))
    blocks = [m for m in model.modules() if isinstance(m, GatedBlock)]
    assert blocks, "the encoder / code decoder are built from GatedBlocks"
    linears = [m for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert 0.018 < weights.std().item() < 0.022, weights.std().item()
    biases = [m.bias for m in linears if m.bias is not None]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
