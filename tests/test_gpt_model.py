"""GPT architecture: sizes, cached-vs-teacher-forced parity, GQA, training behaviour, input checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autoregressive import GPT, GPT_PRESETS, gpt_config_from_yaml
from autoregressive.config import GPTConfig
from tests.gpt_testing import assert_max_close, random_gpt, tiny_config

CONFIGS = Path(__file__).parents[1] / "configs" / "ar"

# docs/checkpoint_format.md §4.1
SIZES = {
    "GPT-B": (2048, 110_888_448),
    "GPT-L": (2816, 342_910_976),
    "GPT-XL": (3584, 774_699_520),
    "GPT-XXL": (4096, 1_410_972_672),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_preset_sizes(name):
    with torch.device("meta"):
        model = GPT(GPT_PRESETS[name])
    hidden, params = SIZES[name]
    assert model.config.ffn_hidden == hidden
    assert model.num_params() == params
    assert model.cls_embedding.embedding_table.num_embeddings == 1001


@pytest.mark.parametrize("stem,preset", [("gpt_b", "GPT-B"), ("gpt_l", "GPT-L"), ("gpt_xl", "GPT-XL"),
                                         ("gpt_xxl", "GPT-XXL"), ("tiny", "tiny")])
def test_yaml_configs_match_presets(stem, preset):
    assert gpt_config_from_yaml(CONFIGS / f"{stem}.yaml") == GPT_PRESETS[preset]


def test_yaml_preset_with_override_and_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: GPT-L\n  drop_path_rate: 0.1\ntrain:\n  lr: 1.0\n")
    config = gpt_config_from_yaml(path)
    assert config.dim == 1024 and config.drop_path_rate == 0.1
    path.write_text("model:\n  preset: GPT-L\n  n_layers: 3\n")
    with pytest.raises(ValueError, match="n_layers"):
        gpt_config_from_yaml(path)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(dim=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="cls_token_num"):
        GPTConfig(cls_token_num=2)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(dim=65, n_head=4)


def test_zero_initialised_head_predicts_uniform():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    codes = torch.randint(0, 64, (2, 16))
    logits = model(codes, torch.tensor([1, 2]))
    assert torch.count_nonzero(model.output.weight) == 0
    loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    assert loss.item() == pytest.approx(math.log(64), abs=1e-6)


def test_teacher_forcing_is_causal_and_accepts_short_sequences():
    model = random_gpt()
    codes = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([3, 4])
    with torch.no_grad():
        full = model(codes, labels)
        short = model(codes[:, :7], labels)
        changed = codes.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 64
        after = model(changed, labels)
    assert short.shape == (2, 7, 64)
    assert_max_close(short, full[:, :7])
    # Row i sees codes < i only: changing codes 7.. leaves rows 0..7 untouched.
    assert_max_close(after[:, :8], full[:, :8])
    assert not torch.allclose(after[:, 8:], full[:, 8:])


@pytest.mark.parametrize("batch,kv_heads", [(1, None), (3, None), (8, None), (3, 2), (5, 1)])
@torch.no_grad()
def test_cached_decoding_matches_teacher_forcing(batch, kv_heads):
    model = random_gpt(seed=batch, n_kv_head=kv_heads)
    codes = torch.randint(0, 64, (batch, 16), generator=torch.Generator().manual_seed(batch))
    labels = torch.randint(0, 11, (batch,), generator=torch.Generator().manual_seed(batch + 1))
    reference = model(codes, labels)
    # A larger cache than needed: unused rows and positions must not leak into the result.
    model.setup_caches(batch + 2, 16)
    steps = [model.forward_cached(torch.tensor([0]), labels=labels)]
    steps += [model.forward_cached(torch.tensor([i + 1]), codes=codes[:, i : i + 1]) for i in range(15)]
    assert_max_close(torch.cat(steps, dim=1), reference)
    # A multi-token prefill (class + 5 codes) followed by single steps gives the same logits.
    chunk = model.forward_cached(torch.arange(6), codes=codes[:, :5], labels=labels)
    steps = [model.forward_cached(torch.tensor([i + 1]), codes=codes[:, i : i + 1]) for i in range(5, 15)]
    assert_max_close(torch.cat([chunk] + steps, dim=1), reference)


def test_gqa_cache_stores_only_kv_heads():
    model = random_gpt(n_kv_head=2)
    assert model.layers[0].attention.wqkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    model.setup_caches(3, 10)
    assert model.layers[0].attention.kv_cache.k_cache.shape == (3, 2, 16, 16)


def test_cache_limits_are_checked():
    model = random_gpt()
    with pytest.raises(ValueError, match="rotary positions"):
        model.setup_caches(1, 18)
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="exceeds the KV cache batch"):
        model.forward_cached(torch.tensor([0]), labels=torch.tensor([1, 2]))
    model.clear_caches()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.forward_cached(torch.tensor([0]), labels=torch.tensor([1]))


def test_label_dropout_only_in_training():
    model = random_gpt(class_dropout_prob=0.999, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    codes = torch.randint(0, 64, (4, 16))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        conditional = model(codes, labels)
        unconditional = model(codes, torch.full_like(labels, 10))
        torch.manual_seed(0)
        dropped = model.train()(codes, labels)
    # p=0.999: every label became the null class in training mode.
    assert_max_close(dropped, unconditional)
    assert not torch.allclose(conditional, unconditional)


def test_dropout_active_in_training_and_backward_runs():
    model = random_gpt(drop_path_rate=0.1, attn_dropout_p=0.1).train()
    codes = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 2])
    torch.manual_seed(0)
    a = model(codes, labels)
    b = model(codes, labels)
    assert not torch.allclose(a, b)
    F.cross_entropy(a.flatten(0, 1), codes.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_drop_path_draws_and_scales_like_timm():
    from timm.layers import DropPath as TimmDropPath

    from autoregressive.model import DropPath

    x = torch.randn(64, 5, 8)
    ours, theirs = DropPath(0.25).train(), TimmDropPath(0.25).train()
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = theirs(x)
    assert torch.equal(a, b)
    kept = a.flatten(1).abs().sum(1) > 0
    assert 0 < int(kept.sum()) < 64  # whole samples are dropped, the rest scaled by 1 / keep
    torch.testing.assert_close(a[kept], x[kept] / 0.75)
    assert torch.equal(ours.eval()(x), x)
    with pytest.raises(ValueError, match="drop-path"):
        DropPath(1.0)


def test_bad_inputs_raise():
    model = random_gpt()
    codes = torch.randint(0, 64, (2, 16))
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="codes must be in"):
        model(codes + 64, labels)
    with pytest.raises(ValueError, match="labels must be in"):
        model(codes, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 64, (2, 17)), labels)
    with pytest.raises(ValueError, match="batch"):
        model(codes, torch.tensor([1]))
    with pytest.raises(ValueError, match="integer"):
        model(codes.float(), labels)


def test_setup_caches_reallocates_a_mask_left_on_another_device() -> None:
    # The cache and mask are plain attributes (not buffers), so `.to()` does not move them; a stale
    # mask on another device must be rebuilt even when the cache itself looks reusable.
    import autoregressive.model as m

    gpt = m.GPT(m.GPT_PRESETS["tiny"]).eval()
    gpt.setup_caches(2, 17)
    gpt.causal_mask = gpt.causal_mask.to("meta")
    gpt.setup_caches(2, 17)
    assert gpt.causal_mask.device.type == "cpu"
