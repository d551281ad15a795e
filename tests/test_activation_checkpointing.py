"""Activation checkpointing recomputes blocks in backward; the gradients must not change."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from autoregressive.config import GPT_PRESETS
from autoregressive.model import GPT
from tokenizer.config import TOKENIZER_PRESETS
from tokenizer.model import DARTokenizer


def _gpt_grads(activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # Dropout on (the tiny preset's 0.1): the recomputation must redraw the same masks.
    model = GPT(GPT_PRESETS["tiny"], activation_checkpointing=activation_checkpointing).train()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # a zero head would stop every gradient below it
    codes = torch.randint(0, 64, (3, 16))
    labels = torch.randint(0, 10, (3,))
    logits = model(codes, labels)
    F.cross_entropy(logits.flatten(0, 1), codes.flatten()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gpt_activation_checkpointing_keeps_gradients() -> None:
    plain, recomputed = _gpt_grads(False), _gpt_grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for name, g in plain.items() if name.startswith("layers."))


def test_gpt_activation_checkpointing_is_a_switch_outside_the_config() -> None:
    model = GPT(GPT_PRESETS["tiny"])
    assert model.activation_checkpointing is False
    assert model.set_activation_checkpointing(True) is model and model.activation_checkpointing
    assert not hasattr(model.config, "activation_checkpointing")  # saved configs stay as they were


def _tokenizer_grads(activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    base = TOKENIZER_PRESETS["tiny"]
    config = replace(base, grad_checkpointing=activation_checkpointing,
                     diff_decoder=replace(base.diff_decoder, grad_checkpointing=activation_checkpointing))
    torch.manual_seed(0)
    model = DARTokenizer(config).train()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = model(images, generator=torch.Generator().manual_seed(2))
    sum(out.losses.values()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_tokenizer_activation_checkpointing_keeps_gradients() -> None:
    plain, recomputed = _tokenizer_grads(False), _tokenizer_grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_tokenizer_recipe_activation_checkpointing_overrides_the_model(tmp_path) -> None:
    from tokenizer.train import load_train_config, with_activation_checkpointing

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: v1\ntrain:\n  activation_checkpointing: false\n")
    cfg = with_activation_checkpointing(load_train_config(recipe))
    assert not cfg.model.grad_checkpointing and not cfg.model.diff_decoder.grad_checkpointing
    recipe.write_text("model: v1\ntrain: {}\n")  # unset: the model's own grad_checkpointing stays
    assert with_activation_checkpointing(load_train_config(recipe)).model.grad_checkpointing
