"""Our tokenizer on the official golden weights reproduces every ``tok.*`` tensor of golden_tiny.pt.

Tolerance (docs/checkpoint_format.md): floats max|ours − golden| ≤ 1e-6 + 2e-5·max|golden|; codes exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizer import DARTokenizer, load_tokenizer_from_official

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.pt"


def assert_golden(ours: torch.Tensor, golden: torch.Tensor, name: str) -> None:
    assert ours.shape == golden.shape, f"{name}: shape {tuple(ours.shape)} vs golden {tuple(golden.shape)}"
    err = (ours.double() - golden.double()).abs().max().item()
    tol = 1e-6 + 2e-5 * golden.abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3g} exceeds {tol:.3g}"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def model(golden: dict) -> DARTokenizer:
    return load_tokenizer_from_official(golden["tok.state_dict"], golden["tok.config"])


def test_loaded_model_is_eval_and_golden_config_converted(model: DARTokenizer, golden: dict) -> None:
    assert not model.training
    cfg = model.config
    assert (cfg.num_all_queries, cfg.queries_per_step, cfg.sampling_resolution) == (16, 8, 64)
    assert cfg.diff_decoder.time_shift == 2.0 and cfg.diff_decoder.data_std == 0.6


def test_encoder_codes_pre_quant_and_margin(model: DARTokenizer, golden: dict) -> None:
    images = golden["tok.images"]
    with torch.no_grad():
        latents = model.encode_latents(images)  # (B, N, vq_dim)
    assert_golden(latents.transpose(1, 2).unsqueeze(2), golden["tok.pre_quant"], "pre_quant")
    codes = model.encode(images)
    assert codes.dtype == torch.int64
    assert torch.equal(codes, golden["tok.codes"])
    z = F.normalize(latents, dim=-1)
    dist = torch.cdist(z, model.quantize.codebook()).pow(2)
    best2 = dist.topk(2, dim=-1, largest=False).values
    assert_golden(best2[..., 1] - best2[..., 0], golden["tok.vq_margin"], "vq_margin")


def test_cond_from_codes(model: DARTokenizer, golden: dict) -> None:
    with torch.no_grad():
        cond = model.cond_from_codes(golden["tok.codes"])
    assert_golden(cond, golden["tok.cond"], "cond")


def test_schedule_and_condition_slices(model: DARTokenizer, golden: dict) -> None:
    steps = model.config.num_denoising_steps
    assert [list(model.schedule.window(i)) for i in range(steps)] == golden["tok.cond_slices"]
    sigmas = model.schedule.sigmas()
    assert sigmas[-1].item() == 1.0
    assert_golden(sigmas[:-1], golden["tok.schedule_full"], "schedule_full")


def test_net_probe(model: DARTokenizer, golden: dict) -> None:
    probe = golden["tok.net_probe"]
    begin, end = probe["cond_slice"]
    with torch.no_grad():
        v = model.velocity(golden["tok.noise"], probe["t"], golden["tok.cond"][:, begin:end])
    assert_golden(v, probe["v"], "net_probe.v")


def test_full_decode_and_every_sampler_step(model: DARTokenizer, golden: dict) -> None:
    codes, noise = golden["tok.codes"], golden["tok.noise"]
    decoded = model.decode(codes, noise=noise)
    assert_golden(decoded, golden["tok.decoded"], "decoded")

    # The same decode through the public step-wise API, recording what the network sees.
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        cond = model.cond_from_codes(codes)
        state = model.start_sampler(codes.shape[0], noise=noise)
        while not state.done:
            begin, end = model.schedule.window(state.step_index)

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                v = model.velocity(x, t, cond[:, begin:end])
                seen.append((x, t, v))
                return v

            state.step(velocity)
    assert len(seen) == 4
    for i, (x, t, v) in enumerate(seen):
        assert_golden(x, golden["tok.sampler_x_in"][i], f"sampler_x_in[{i}]")
        assert_golden(v, golden["tok.sampler_v_out"][i], f"sampler_v_out[{i}]")
        assert torch.all(t == t[0])
        assert_golden(t[:1], golden["tok.sampler_t_in"][i : i + 1], f"sampler_t_in[{i}]")
    assert_golden(model.to_image(state.x), golden["tok.decoded"], "decoded via SequentialSampler")


def test_preview_decode(model: DARTokenizer, golden: dict) -> None:
    k = golden["tok.preview_steps"]
    preview = model.decode(golden["tok.codes"], noise=golden["tok.noise"], steps=k)
    assert_golden(preview, golden["tok.decoded_preview"], "decoded_preview")
    previews = model.previews(golden["tok.codes"], noise=golden["tok.noise"])
    assert_golden(previews[k - 1], golden["tok.decoded_preview"], "previews()[k-1]")
    assert_golden(previews[-1], golden["tok.decoded"], "previews()[-1]")


def test_decode_with_seeded_global_rng_matches_reference_noise_draw(model: DARTokenizer, golden: dict) -> None:
    """noise=None draws one CPU randn(B, 3, R, R), R = sampling_resolution, like the reference sampler."""
    generator = torch.Generator().manual_seed(123)
    expected_noise = torch.randn(golden["tok.noise"].shape, generator=torch.Generator().manual_seed(123))
    ours = model.decode(golden["tok.codes"], generator=generator)
    assert torch.equal(ours, model.decode(golden["tok.codes"], noise=expected_noise))
