"""Official and own checkpoint layouts load strictly and safely; save/load round trips."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

import autoregressive.loading as gpt_loading
from autoregressive import GPT, GPT_PRESETS, load_gpt_from_official
from autoregressive.model import build_gpt, convert_official_state_dict
from tests.gpt_testing import DATA, load_golden, random_gpt
from utils.config import dataclass_to_dict

GOLDEN = load_golden()


def keys_file(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / f"checkpoint_keys_{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split()
        shapes[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return shapes


@pytest.mark.parametrize("name", ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL"])
def test_official_key_names_and_shapes(name):
    with torch.device("meta"):
        model = GPT(GPT_PRESETS[name])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys_file(name)


def test_random_official_gpt_l_state_dict_loads_strictly():
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in keys_file("GPT-L").items()}
    model = build_gpt(GPT_PRESETS["GPT-L"], state)
    assert model.num_params() == 342_910_976
    assert not model.training
    assert torch.equal(model.layers[23].feed_forward.w2.weight, state["layers.23.feed_forward.w2.weight"])


def official_tiny() -> dict[str, torch.Tensor]:
    return dict(GOLDEN["gpt.state_dict"])


def test_missing_renamed_and_misshapen_keys_are_named():
    config = GOLDEN["gpt.config"]
    state = official_tiny()
    del state["layers.1.ffn_norm.weight"]
    with pytest.raises(KeyError, match=r"missing keys: layers\.1\.ffn_norm\.weight"):
        load_gpt_from_official(state, config)
    state = official_tiny()
    state["layers.0.attn.wqkv.weight"] = state.pop("layers.0.attention.wqkv.weight")
    with pytest.raises(KeyError, match=r"unexpected keys: layers\.0\.attn\.wqkv\.weight"):
        load_gpt_from_official(state, config)
    state = official_tiny()
    state["norm.weight"] = torch.ones(65)
    with pytest.raises(KeyError, match=r"norm\.weight: checkpoint \(65,\)"):
        load_gpt_from_official(state, config)


def test_official_conversion_quirks():
    state = {f"_orig_mod.{k}": v for k, v in official_tiny().items()}
    state["freqs_cis"] = GOLDEN["gpt.freqs_cis"]
    assert set(convert_official_state_dict(state)) == set(official_tiny())
    model = load_gpt_from_official(state, GOLDEN["gpt.config"])
    assert torch.equal(model.output.weight, official_tiny()["output.weight"])


def test_official_config_checks():
    config = dict(GOLDEN["gpt.config"], caption_dim=2048, max_batch_size=32, max_seq_len=2048)
    load_gpt_from_official(official_tiny(), config)
    with pytest.raises(ValueError, match="n_layers"):
        load_gpt_from_official(official_tiny(), dict(config, n_layers=2))
    with pytest.raises(ValueError, match="c2i"):
        load_gpt_from_official(official_tiny(), dict(config, model_type="t2i"))


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "bare"])
def test_official_pt_layouts(tmp_path, layout):
    state = official_tiny()
    obj = state if layout == "bare" else {layout: state, "steps": 10}
    torch.save(obj, tmp_path / "gpt.pt")
    model = GPT.from_pretrained(tmp_path / "gpt.pt", preset="tiny")
    assert torch.equal(model.tok_embeddings.weight, state["tok_embeddings.weight"])
    assert not model.training


def test_model_wins_over_ema_unless_asked(tmp_path):
    state = official_tiny()
    ema = {k: v + 1 for k, v in state.items()}
    torch.save({"model": state, "ema": ema}, tmp_path / "gpt.pt")
    assert torch.equal(GPT.from_pretrained(tmp_path / "gpt.pt", preset="tiny").norm.weight, state["norm.weight"])
    with_ema = GPT.from_pretrained(tmp_path / "gpt.pt", preset="tiny", ema=True)
    assert torch.equal(with_ema.norm.weight, ema["norm.weight"])
    # A run trained with EMA off (the paper recipes) has none: its raw weights, with a warning.
    torch.save({"model": state}, tmp_path / "no_ema.pt")
    with pytest.warns(UserWarning, match="no EMA weights"):
        without = GPT.from_pretrained(tmp_path / "no_ema.pt", preset="tiny", ema=True)
    assert torch.equal(without.norm.weight, state["norm.weight"])


def test_file_without_config_needs_a_preset(tmp_path):
    torch.save({"model": official_tiny()}, tmp_path / "gpt.pt")
    with pytest.raises(ValueError, match="preset"):
        GPT.from_pretrained(tmp_path / "gpt.pt")
    with pytest.raises(ValueError, match="unknown preset"):
        GPT.from_pretrained(tmp_path / "gpt.pt", preset="GPT-M")


def test_own_training_checkpoint_carries_its_config(tmp_path):
    model = random_gpt(n_kv_head=2)
    torch.save({"model": model.state_dict(), "gpt_config": dataclass_to_dict(model.config)}, tmp_path / "ours.pt")
    loaded = GPT.from_pretrained(tmp_path / "ours.pt")
    assert loaded.config == model.config
    with pytest.raises(ValueError, match="differs from preset"):
        GPT.from_pretrained(tmp_path / "ours.pt", preset="tiny")
    run_config = {"model": dataclass_to_dict(model.config), "train": {}}
    torch.save({"model": model.state_dict(), "config": run_config}, tmp_path / "run.pt")
    assert GPT.from_pretrained(tmp_path / "run.pt").config == model.config


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    model = random_gpt(n_kv_head=1)
    model.save_pretrained(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"model.safetensors", "config.yaml"}
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    for source in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = GPT.from_pretrained(source)
        assert loaded.config == model.config
        assert torch.equal(loaded(codes, labels), model(codes, labels))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": official_tiny(), "extra": _Payload(marker)}, f, protocol=2)
    torch.save({"model": official_tiny(), "extra": _Payload(marker)}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(pickle.UnpicklingError):
            GPT.from_pretrained(tmp_path / name, preset="tiny")
    assert not marker.exists()


def test_hub_files_follow_the_preset(monkeypatch, tmp_path):
    """showlab/D-AR + preset picks the released file, and the file name picks the preset."""
    requested = []

    def fake_resolve(path_or_repo_id, filename=None, default_filename=None):
        requested.append((str(path_or_repo_id), filename))
        raise FileNotFoundError("offline")

    monkeypatch.setattr(gpt_loading, "resolve_file", fake_resolve)
    for preset, filename in (("GPT-L", "D-AR-L-360K.pt"), ("GPT-XL", "D-AR-XL-360K.pt")):
        with pytest.raises(FileNotFoundError):
            GPT.from_pretrained("showlab/D-AR", preset=preset)
        assert requested[-1] == ("showlab/D-AR", filename)

    state = official_tiny()
    torch.save({"model": state}, tmp_path / "D-AR-L-360K.pt")
    monkeypatch.setattr(gpt_loading, "resolve_file", lambda *a, **k: tmp_path / "D-AR-L-360K.pt")
    # The file name implies GPT-L, whose shapes the tiny weights do not fit: the strict load says so.
    with pytest.raises(KeyError, match="shape mismatches"):
        GPT.from_pretrained("showlab/D-AR", filename="D-AR-L-360K.pt")
