"""Strict, safe weight loading: official key layout, containers, pickles, our own save format, configs."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from tokenizer import (
    TOKENIZER_PRESETS,
    DARTokenizer,
    StateDictMismatchError,
    TokenizerConfig,
    from_official,
    load_tokenizer_config,
    load_tokenizer_from_official,
)
from utils.config import ConfigError
from utils.hub import WeightsNotFoundError

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parent.parent / "configs" / "tokenizer"

# The `model:` section of the official configs/tokenizer_v1.yaml, as listed in docs/checkpoint_format.md §2.
OFFICIAL_V1 = {
    "encoder_patch_size": 16, "num_encoder_layers": 8, "num_decoder_layers": 8, "query_low_rank": True,
    "encoder_dim": 768, "decoder_dim": 768, "vq_dim": 8, "vq_codebook_size": 16384, "num_denoising_steps": 8,
    "num_query_groups": 8, "num_all_queries": 256, "queries_per_step": 32, "vq_enable": True,
    "diff_decoder": {
        "in_dim": 3, "out_dim": 3, "dim": 768, "cond_dim": 768, "patch_size": 8, "depth": 12,
        "data_std": 0.6, "time_shift": 2, "mlp_head": False, "share_time_encoding": False,
    },
}


def v1_keys() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / "checkpoint_keys_tokenizer_v1.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split()
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s)
    return shapes


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """v1 is 307M parameters (1.2 GB fp32); meta tensors check keys and shapes without the memory."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(DATA / "golden_tiny.pt", weights_only=True)


def test_v1_official_keys_load_strictly_into_the_v1_preset() -> None:
    shapes = v1_keys()
    assert len(shapes) == 830
    assert from_official(OFFICIAL_V1) == TOKENIZER_PRESETS["v1"]
    model = load_tokenizer_from_official(meta_state_dict(shapes), OFFICIAL_V1)
    assert not model.training
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert sum(p.numel() for p in model.parameters()) == 307_444_672


def test_renamed_missing_and_misshapen_keys_are_named() -> None:
    shapes = v1_keys()
    renamed = meta_state_dict(shapes)
    renamed["encoder_layers.3.attention.q_nrm.weight"] = renamed.pop("encoder_layers.3.attention.q_norm.weight")
    with pytest.raises(StateDictMismatchError) as info:
        load_tokenizer_from_official(renamed, OFFICIAL_V1)
    assert "missing keys: encoder_layers.3.attention.q_norm.weight" in str(info.value)
    assert "unexpected keys: encoder_layers.3.attention.q_nrm.weight" in str(info.value)

    missing = meta_state_dict(shapes)
    del missing["diff_decoder.net.blocks.11.cond_embed.2.bias"]
    with pytest.raises(StateDictMismatchError, match=re.escape("diff_decoder.net.blocks.11.cond_embed.2.bias")):
        load_tokenizer_from_official(missing, OFFICIAL_V1)

    misshapen = meta_state_dict(shapes)
    misshapen["quant_in_conv.weight"] = torch.empty(16, 768, 1, 1, device="meta")
    with pytest.raises(StateDictMismatchError, match=re.escape("quant_in_conv.weight: checkpoint (16, 768, 1, 1)")):
        load_tokenizer_from_official(misshapen, OFFICIAL_V1)


def test_optional_entries_repa_head_and_codebook_usage(golden: dict) -> None:
    state = golden["tok.state_dict"]
    # The golden tiny config (depth 2 < repa_layer 8) has no REPA tap: official REPA keys are dropped.
    with_repa = dict(state) | {k: torch.zeros(s) for k, s in golden["tok.omitted_keys"].items()}
    without_usage = {k: v for k, v in state.items() if k != "quantize.codebook_used"}
    for variant in (state, with_repa, without_usage):
        model = load_tokenizer_from_official(variant, golden["tok.config"])
        assert torch.equal(model.encode(golden["tok.images"]), golden["tok.codes"])
    # A config with a REPA tap initialises a head the checkpoint lacks, and rejects half of one.
    cfg = dict(golden["tok.config"]) | {"diff_decoder": dict(golden["tok.config"]["diff_decoder"], repa_layer=1)}
    model = load_tokenizer_from_official(state, cfg)
    assert not any(t.is_meta for t in model.state_dict().values())
    partial = dict(state) | {"diff_decoder.net.repa_out.0.weight": torch.zeros(2048, 64)}
    with pytest.raises(StateDictMismatchError, match="incomplete REPA head"):
        load_tokenizer_from_official(partial, cfg)


def test_official_container_prefers_ema_and_uses_embedded_config(golden: dict, tmp_path: Path) -> None:
    ema = golden["tok.state_dict"]
    model_weights = {k: torch.zeros_like(v) for k, v in ema.items()}
    # An official training file: config_util.Config and argparse.Namespace pickles besides tensors.
    config_util = types.ModuleType("config_util")

    class Config:
        def __init__(self, data: dict) -> None:
            self._data = data

    Config.__module__, Config.__qualname__ = "config_util", "Config"
    config_util.Config = Config
    sys.modules["config_util"] = config_util
    try:
        container = {
            "model": model_weights, "ema": ema, "steps": 10,
            "config": Config({"model": golden["tok.config"]}), "args": argparse.Namespace(lr=1e-4),
        }
        torch.save(container, tmp_path / "official.pt")
    finally:
        del sys.modules["config_util"]
    loaded = DARTokenizer.from_pretrained(tmp_path / "official.pt")
    assert loaded.config == from_official(golden["tok.config"])
    assert torch.equal(loaded.encode(golden["tok.images"]), golden["tok.codes"])

    torch.save({"model": ema}, tmp_path / "model_only.pt")
    torch.save(ema, tmp_path / "bare.pt")
    for name in ("model_only.pt", "bare.pt"):
        with pytest.raises(StateDictMismatchError):  # no embedded config: the v1 preset does not fit
            DARTokenizer.from_pretrained(tmp_path / name)
        loaded = DARTokenizer.from_pretrained(tmp_path / name, config=from_official(golden["tok.config"]))
        assert torch.equal(loaded.encode(golden["tok.images"]), golden["tok.codes"])


class _Exploit:
    marker: str = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    torch.save({"model": {"x": torch.zeros(1)}, "payload": exploit}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(Exception, match="refusing to load"):
        DARTokenizer.from_pretrained(tmp_path / "evil.pt")
    assert not marker.exists()


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    config = dataclasses.replace(TOKENIZER_PRESETS["tiny"], num_decoder_layers=1)
    model = DARTokenizer(config)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.normal_()
    model.save_pretrained(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"model.safetensors", "tokenizer_config.yaml"}
    for source in (tmp_path / "tok", tmp_path / "tok" / "model.safetensors"):
        loaded = DARTokenizer.from_pretrained(source)
        assert loaded.config == config and not loaded.training
        expected = model.state_dict()
        assert loaded.state_dict().keys() == expected.keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_offline_hub_without_cache_gives_an_actionable_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="D-AR-tokenizer_v1.pt"):
        DARTokenizer.from_pretrained("showlab/D-AR")


def test_yaml_presets_load_strictly(tmp_path: Path) -> None:
    for name in ("v1", "tiny"):
        assert load_tokenizer_config(CONFIGS / f"{name}.yaml") == TOKENIZER_PRESETS[name]
        assert load_tokenizer_config(name) == TOKENIZER_PRESETS[name]
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny.yaml").read_text() + "num_encoder_layrs: 3\n")
    with pytest.raises(ConfigError, match="num_encoder_layrs"):
        load_tokenizer_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text((CONFIGS / "tiny.yaml").read_text().replace("  depth: 2\n", "  depth: 2\n  deepth: 2\n"))
    with pytest.raises(ConfigError, match="deepth"):
        load_tokenizer_config(nested)


def test_official_config_conversion_is_strict(golden: dict) -> None:
    cfg = from_official(golden["tok.config"])
    assert isinstance(cfg, TokenizerConfig)
    assert cfg.sampling_resolution == 64 and cfg.diff_decoder.depth == 2 and cfg.queries_per_step == 8
    with pytest.raises(ConfigError, match="num_encoder_layerz"):
        from_official(dict(golden["tok.config"], num_encoder_layerz=2))
    with pytest.raises(ConfigError, match="dept"):
        from_official(dict(golden["tok.config"], diff_decoder=dict(golden["tok.config"]["diff_decoder"], dept=1)))
    with pytest.raises(ConfigError, match="vq_enable"):
        from_official(dict(golden["tok.config"], vq_enable=False))
    defaults = {k: v for k, v in OFFICIAL_V1.items() if k != "queries_per_step"}
    diff = OFFICIAL_V1["diff_decoder"]
    defaults["diff_decoder"] = {k: v for k, v in diff.items() if k not in ("data_std", "time_shift")}
    converted = from_official(defaults)  # the official code's defaults, not our preset's
    assert converted.queries_per_step == 32
    assert (converted.diff_decoder.data_std, converted.diff_decoder.time_shift) == (1.0, 1.0)
    with pytest.raises(ConfigError, match="cond_dim"):
        dataclasses.replace(TOKENIZER_PRESETS["tiny"], decoder_dim=128)


def test_trainer_style_container_with_our_config(golden: dict, tmp_path: Path) -> None:
    from utils.config import dataclass_to_dict

    config = from_official(golden["tok.config"])
    torch.save({"ema": golden["tok.state_dict"], "tokenizer_config": dataclass_to_dict(config)}, tmp_path / "ours.pt")
    loaded = DARTokenizer.from_pretrained(tmp_path / "ours.pt")
    assert loaded.config == config
    assert torch.equal(loaded.encode(golden["tok.images"]), golden["tok.codes"])
