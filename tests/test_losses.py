"""Tokenizer auxiliary losses: LPIPS, REPA, PatchGAN. Random-init networks only; nothing is downloaded."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tokenizer.lpips as lpips_module
from tokenizer.losses import (
    DISCRIMINATOR_PRESETS,
    LPIPS,
    REPA_ENCODER_PRESETS,
    DiscriminatorConfig,
    PatchGANDiscriminator,
    RepaEncoderConfig,
    RepaFeatureExtractor,
    WeightsNotFoundError,
    adaptive_gan_weight,
    discriminator_loss,
    gan_active,
    generator_loss,
    lpips_term,
    repa_loss,
)


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache, no `lpips` package, and every download failing as it does offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(lpips_module, "_bundled_lpips_head", lambda: None)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    return tmp_path


# --- LPIPS ---------------------------------------------------------------------------------------


def test_lpips_is_a_distance(lpips: LPIPS) -> None:
    x, y = _images(3, 32, seed=1), _images(3, 32, seed=2)
    assert torch.equal(lpips(x, x), torch.zeros(3))
    d_xy = lpips(x, y)
    assert d_xy.shape == (3,) and (d_xy > 0).all()
    torch.testing.assert_close(d_xy, lpips(y, x))
    # A small perturbation is closer than an unrelated image.
    assert (lpips(x, x + 0.05 * (y - x)) < d_xy).all()


def test_lpips_gradients_reach_inputs_only(lpips: LPIPS) -> None:
    x = _images(2, 32, seed=3).requires_grad_(True)
    lpips(x, _images(2, 32, seed=4)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())


def test_lpips_against_a_fixed_target_runs_the_target_without_autograd(lpips: LPIPS) -> None:
    """With one side requiring grad (training) the target's pass runs under no_grad; the distances and
    the gradients equal those of the one-pass path, and the backward holds half the activations."""
    target = _images(2, 32, seed=7)
    outputs = {}
    for side in ("x", "y", "both"):
        recon = _images(2, 32, seed=8).requires_grad_(True)
        other = target.clone().requires_grad_(side == "both")
        saved = []  # activations the graph keeps (the frozen weights are kept either way)
        weights = {p.data_ptr() for p in lpips.parameters()}

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved.append(0 if t.data_ptr() in weights else t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            distance = lpips(recon, other) if side == "x" else lpips(other, recon)
        distance.sum().backward()
        outputs[side] = distance.detach(), recon.grad, sum(saved)
    for side in ("x", "y"):
        torch.testing.assert_close(outputs[side][0], outputs["both"][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(outputs[side][1], outputs["both"][1], rtol=1e-5, atol=1e-8)
        assert outputs[side][2] < 0.6 * outputs["both"][2]


def test_lpips_term_takes_the_vgg_backward_chunk_by_chunk(lpips: LPIPS) -> None:
    """The training term: same value and gradient as the plain mean, but the returned graph holds no VGG
    activations, only the gradient it already computed (one node between the term and its input)."""
    target = _images(5, 32, seed=9)
    weight = torch.tensor(0.7, requires_grad=True)  # something upstream of the reconstruction
    recon = _images(5, 32, seed=10) * weight
    plain = lpips(target, recon).mean()
    (plain_grad,) = torch.autograd.grad(plain, weight, retain_graph=True)
    term = lpips_term(lpips, target, recon, chunk=2)  # chunks of 2, 2 and 1
    assert term.grad_fn.next_functions[0][0] is recon.grad_fn
    torch.testing.assert_close(term, plain, rtol=1e-6, atol=1e-7)
    (term_grad,) = torch.autograd.grad(0.25 * term, weight)  # a weighted term, as in the loss
    torch.testing.assert_close(term_grad, 0.25 * plain_grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(lpips_term(lpips, target, recon), plain)
    moving = target.clone().requires_grad_(True)  # a target that needs its gradient too: the plain path
    lpips_term(lpips, moving, _images(5, 32, seed=10) * weight, chunk=2).backward()
    assert moving.grad is not None and moving.grad.abs().sum() > 0
    # Under bf16 autocast (the trainers' GPU precision) as under the plain mean, whose backward runs outside it.
    recon = _images(5, 32, seed=10) * weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, term = lpips(target, recon).mean(), lpips_term(lpips, target, recon, chunk=2)
    torch.testing.assert_close(term, plain, rtol=1e-2, atol=1e-4)
    (plain_grad,) = torch.autograd.grad(plain, weight, retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(term, weight)[0], plain_grad, rtol=2e-2, atol=1e-5)


def test_lpips_stays_in_eval_mode(lpips: LPIPS) -> None:
    parent = torch.nn.ModuleDict({"lpips": lpips})
    parent.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())


def test_lpips_rejects_bad_inputs(lpips: LPIPS) -> None:
    with pytest.raises(ValueError, match="equal shape"):
        lpips(_images(2, 32, 0), _images(1, 32, 0))
    with pytest.raises(ValueError, match="at least 16"):
        lpips(_images(1, 8, 0), _images(1, 8, 0))


def test_lpips_reference_formula(lpips: LPIPS) -> None:
    """The fused forward equals the textbook per-layer 1x1-conv-then-spatial-mean LPIPS."""
    x, y = _images(2, 32, seed=5), _images(2, 32, seed=6)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy, expected = (x - shift) / scale, (y - shift) / scale, torch.zeros(2)
    taps = iter(lpips.heads)
    for index, layer in enumerate(lpips.features):
        hx, hy = layer(hx), layer(hy)
        if isinstance(layer, torch.nn.ReLU) and index in (3, 8, 15, 22, 29):
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            expected += next(taps)((nx - ny) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lpips(x, y), expected)


def test_lpips_weight_files_round_trip(lpips: LPIPS, tmp_path: Path) -> None:
    heads = lpips.head_state_dict()
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    torch.save(heads, tmp_path / "vgg.pth")
    # torchvision's file also carries the classifier, which LPIPS ignores.
    backbone = {**lpips.backbone_state_dict(), "classifier.0.weight": torch.zeros(4, 4)}
    torch.save(backbone, tmp_path / "vgg16.pth")
    torch.manual_seed(123)
    loaded = LPIPS(pretrained=True, backbone_weights=tmp_path / "vgg16.pth", head_weights=tmp_path / "vgg.pth")
    x, y = _images(2, 32, seed=7), _images(2, 32, seed=8)
    torch.testing.assert_close(loaded(x, y), lpips(x, y), rtol=0, atol=0)


def test_lpips_head_loading_is_strict(lpips: LPIPS) -> None:
    heads = lpips.head_state_dict()
    target = LPIPS(pretrained=False)
    with pytest.raises(KeyError, match="lin3.model.1.weight"):
        target.load_head_weights({k: v for k, v in heads.items() if not k.startswith("lin3")})
    with pytest.raises(KeyError, match="lin5.model.1.weight"):
        target.load_head_weights({**heads, "lin5.model.1.weight": torch.ones(1, 8, 1, 1)})
    with pytest.raises(ValueError, match="lin1.model.1.weight has shape"):
        target.load_head_weights({**heads, "lin1.model.1.weight": torch.ones(1, 64, 1, 1)})
    with pytest.raises(ValueError, match="negative"):
        target.load_head_weights({**heads, "lin0.model.1.weight": -heads["lin0.model.1.weight"]})
    backbone = lpips.backbone_state_dict()
    with pytest.raises(KeyError, match="features.28.bias"):
        target.load_backbone_weights({k: v for k, v in backbone.items() if k != "features.28.bias"})
    with pytest.raises(KeyError, match="features.30.weight"):
        target.load_backbone_weights({**backbone, "features.30.weight": torch.ones(1)})


def test_lpips_offline_without_weights_names_file_and_flag(offline: Path, lpips: LPIPS) -> None:
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth") as error:
        LPIPS(pretrained=True)
    assert "--perceptual-weight 0" in str(error.value)
    torch.save(lpips.backbone_state_dict(), offline / "vgg16.pth")
    with pytest.raises(WeightsNotFoundError, match=r"vgg\.pth") as error:
        LPIPS(pretrained=True, backbone_weights=offline / "vgg16.pth")
    assert "--perceptual-weight 0" in str(error.value)
    with pytest.raises(WeightsNotFoundError, match="--perceptual-weight 0"):
        LPIPS(pretrained=True, backbone_weights=offline / "missing.pth")


def test_lpips_uses_the_hub_cache_without_network(offline: Path, lpips: LPIPS) -> None:
    cache = offline / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(lpips.backbone_state_dict(), cache / lpips_module.VGG16_FILENAME)
    torch.save(lpips.head_state_dict(), cache / lpips_module.LPIPS_HEAD_FILENAME)
    cached = LPIPS(pretrained=True)
    x, y = _images(1, 32, seed=9), _images(1, 32, seed=10)
    torch.testing.assert_close(cached(x, y), lpips(x, y), rtol=0, atol=0)


# --- REPA ----------------------------------------------------------------------------------------


def test_repa_loss_values() -> None:
    features = torch.randn(2, 5, 7)
    assert repa_loss(features, features).abs().item() < 1e-6
    assert repa_loss(3.0 * features, features).abs().item() < 1e-6  # scale-invariant
    assert repa_loss(-features, features).item() == pytest.approx(2.0, abs=1e-6)
    orthogonal_a, orthogonal_b = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    assert repa_loss(orthogonal_a, orthogonal_b).item() == pytest.approx(1.0, abs=1e-6)


def test_repa_loss_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="256"):
        repa_loss(torch.randn(2, 64, 768), torch.randn(2, 256, 768))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        repa_loss(torch.randn(2, 768), torch.randn(2, 768))


def test_repa_target_is_a_frozen_ordinary_tensor() -> None:
    torch.manual_seed(0)
    extractor = RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], pretrained=False)
    target = extractor(_images(2, 32, seed=11))
    assert target.shape == (2, 4, 16) and target.dtype == torch.float32 and not target.requires_grad
    pred = torch.randn(2, 4, 16, requires_grad=True)
    repa_loss(pred, target).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert all(not p.requires_grad for p in extractor.parameters())
    torch.nn.ModuleDict({"repa": extractor}).train()
    assert not extractor.training


def test_repa_dinov2_vitb14_shapes() -> None:
    """Random-init ViT-B/14 (86M params, one image): 256 px input -> 16 x 16 patch tokens of width 768."""
    torch.manual_seed(0)
    extractor = RepaFeatureExtractor(REPA_ENCODER_PRESETS["dinov2_vitb14"], pretrained=False)
    assert extractor.grid_size == (16, 16) and extractor.embed_dim == 768 and extractor.vit.num_prefix_tokens == 1
    features = extractor(_images(1, 256, seed=12))
    assert features.shape == (1, 256, 768) and torch.isfinite(features).all()


def test_repa_resize_only_when_needed() -> None:
    """A 28 px input skips the resize; a 32 px one is resized to 28 px first (bicubic, antialiased)."""
    torch.manual_seed(0)
    extractor = RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], pretrained=False)
    image = _images(1, 32, seed=13)
    resized = torch.nn.functional.interpolate((image + 1) / 2, size=(28, 28), mode="bicubic", antialias=True) * 2 - 1
    torch.testing.assert_close(extractor(image), extractor(resized), rtol=1e-5, atol=1e-5)


def test_repa_weights_round_trip_timm_and_original_formats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], pretrained=False)
    image = _images(2, 28, seed=14)
    state = source.vit.state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], weights=tmp_path / "model.safetensors")
    torch.testing.assert_close(loaded(image), source(image), rtol=0, atol=0)
    # The original DINOv2 release stores an unused mask token; timm's converter drops it.
    torch.save({**state, "mask_token": torch.zeros(1, 16)}, tmp_path / "dinov2.pth")
    original = RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], weights=tmp_path / "dinov2.pth")
    torch.testing.assert_close(original(image), source(image), rtol=0, atol=0)
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.bias"):
        loaded.load_weights({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.bias"})
    with pytest.raises(KeyError, match="head.weight"):
        loaded.load_weights({**state, "head.weight": torch.zeros(10, 16)})


def test_repa_position_embeddings_are_resampled_to_the_grid() -> None:
    torch.manual_seed(0)
    larger = RepaFeatureExtractor(RepaEncoderConfig(img_size=42, embed_dim=16, depth=1, num_heads=2), pretrained=False)
    assert larger.vit.pos_embed.shape[1] == 1 + 9
    target = RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], pretrained=False)
    target.load_weights(larger.vit.state_dict())
    assert target.vit.pos_embed.shape[1] == 1 + 4
    assert target(_images(1, 28, seed=15)).shape == (1, 4, 16)


def test_repa_offline_without_weights_names_file_and_flag(offline: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="--repa-weight 0") as error:
        RepaFeatureExtractor(REPA_ENCODER_PRESETS["dinov2_vitb14"], pretrained=True)
    assert "model.safetensors" in str(error.value) and "dinov2_vitb14_pretrain.pth" in str(error.value)
    with pytest.raises(WeightsNotFoundError, match="no published weights"):
        RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], pretrained=True)
    with pytest.raises(WeightsNotFoundError, match="--repa-weight 0"):
        RepaFeatureExtractor(REPA_ENCODER_PRESETS["tiny"], weights=offline / "missing.safetensors")


def test_repa_prefers_the_official_torch_hub_file(offline: Path) -> None:
    """The file the official code's torch.hub DINOv2 cached is used without any hub lookup."""
    torch.manual_seed(0)
    config = RepaEncoderConfig(model_name="vit_tiny_patch16_224", img_size=32)  # small, unmodified
    cache = offline / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = RepaFeatureExtractor(config, pretrained=False)
    torch.save({**source.vit.state_dict(), "mask_token": torch.zeros(1, 192)}, cache / "dinov2_vitb14_pretrain.pth")
    loaded = RepaFeatureExtractor(config, pretrained=True)
    image = _images(1, 32, seed=16)
    torch.testing.assert_close(loaded(image), source(image), rtol=0, atol=0)


# --- PatchGAN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_discriminator_output_shape(norm: str) -> None:
    disc = PatchGANDiscriminator(DiscriminatorConfig(base_channels=8, norm=norm, num_groups=4))
    logits = disc(_images(2, 64, seed=17))
    assert logits.shape == (2, 1, 6, 6) == (2, 1, disc.output_size(64), disc.output_size(64))
    assert disc.output_size(256) == 30  # the classic 30x30 PatchGAN map
    tiny = PatchGANDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    assert tiny(_images(1, 32, seed=18)).shape == (1, 1, tiny.output_size(32), tiny.output_size(32))


def test_discriminator_rejects_bad_configs_and_inputs() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        DiscriminatorConfig(base_channels=6, num_groups=5)
    with pytest.raises(ValueError, match="norm"):
        DiscriminatorConfig(norm="layer")  # type: ignore[arg-type]
    disc = PatchGANDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    with pytest.raises(ValueError, match="too small"):
        disc(_images(1, 4, seed=0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.zeros(1, 1, 32, 32))


def test_group_norm_discriminator_is_per_sample() -> None:
    """No batch coupling: an image's logits do not depend on the rest of the batch (or the world size)."""
    disc = PatchGANDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    images = _images(4, 32, seed=19)
    torch.testing.assert_close(disc(images)[:2], disc(images[:2]))


def test_gan_losses_on_known_logits() -> None:
    zeros = torch.zeros(2, 1, 3, 3)
    assert generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    real, fake = torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), -1.0)
    assert generator_loss(fake).item() == pytest.approx(math.log1p(math.e))
    assert discriminator_loss(real, fake).item() == pytest.approx(math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.0)))
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.0)
    assert discriminator_loss(zeros, zeros, "hinge").item() == pytest.approx(2.0)
    assert discriminator_loss(fake, real, "hinge").item() == pytest.approx(2.0 + 4.0)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(zeros, "wasserstein")  # type: ignore[arg-type]


def test_gan_start_step() -> None:
    assert not gan_active(19_999, 20_000)
    assert gan_active(20_000, 20_000) and gan_active(20_001, 20_000)
    assert gan_active(0, 0)


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    torch.manual_seed(0)
    generator = torch.nn.Conv2d(3, 3, 3, padding=1)
    disc = PatchGANDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    target = _images(2, 32, seed=20)
    output = generator(_images(2, 32, seed=21))
    rec = (output - target).pow(2).mean()
    gan = generator_loss(disc(output))
    weight = adaptive_gan_weight(rec, gan, generator.weight)
    assert weight.ndim == 0 and torch.isfinite(weight) and weight > 0 and not weight.requires_grad
    rec_grad = torch.autograd.grad(rec, generator.weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, generator.weight, retain_graph=True)[0]
    torch.testing.assert_close(weight, rec_grad.norm() / (gan_grad.norm() + 1e-4))
    assert adaptive_gan_weight(rec, gan, generator.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    (rec + weight * gan).backward()  # the graphs survive for the real backward
    assert generator.weight.grad is not None


@pytest.mark.parametrize(("tokenizer_preset", "encoder_preset"), [("v1", "dinov2_vitb14"), ("tiny", "tiny")])
def test_repa_encoder_presets_match_the_tokenizer_repa_heads(tokenizer_preset: str, encoder_preset: str) -> None:
    """The REPA head's (G², D) must equal the encoder's (patches, width), checked without building the ViT-B."""
    from tokenizer.config import TOKENIZER_PRESETS

    decoder = TOKENIZER_PRESETS[tokenizer_preset].diff_decoder
    encoder = REPA_ENCODER_PRESETS[encoder_preset]
    with torch.device("meta"):  # shapes only: no 86M-param allocation or init
        extractor = RepaFeatureExtractor(encoder, pretrained=False)
    assert extractor.grid_size == (decoder.repa_pool_grid, decoder.repa_pool_grid)
    assert extractor.embed_dim == decoder.repa_out_dim
