"""scripts.estimate_memory: the fake-tensor estimate against a real CPU step, and the CLI verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.estimate_memory import Activations, breakdown, load_recipe, main
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# A fresh process builds the recipe's networks for real (the estimator's own builders), takes one
# fp32 training step on the CPU and prints its peak resident memory above the baseline after imports
# and a warm-up step.
_REAL_STEP = r"""
import json, sys
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch
from scripts.estimate_memory import _BUILDERS, load_recipe
from utils.training import OptimConfig, build_optimizer
torch.set_num_threads(1)
recipe = load_recipe(sys.argv[1])

def train_step(batch):
    modules, make_step = _BUILDERS[recipe.kind](recipe, False)
    step = make_step(batch)
    optimizer = build_optimizer(modules[0], OptimConfig(lr=1e-4), torch.device("cpu"))
    step().backward()
    optimizer.step()

# A one-sample step first: it pages in the kernels' code and the thread pools, which count in the
# resident set but are no tensor memory. Its own peak is far below the measured one.
train_step(1)
baseline = rss("VmRSS:")
train_step(recipe.global_batch_size)
print(json.dumps({"peak": rss("VmHWM:") - baseline}))
"""

GPT_RECIPE = """
model: {{dim: {dim}, n_layer: 2, n_head: 4, vocab_size: 4096, block_size: 256, num_classes: 10}}
train: {{global_batch_size: {batch}, precision: fp32}}
"""
TOKENIZER_RECIPE = """
model:
  preset: tiny
  encoder_dim: {dim}
  decoder_dim: {dim}
  diff_decoder: {{dim: {dim}, cond_dim: {dim}}}
train:
  image_size: 64
  global_batch_size: {batch}
  precision: fp32
  optim: {{ema_decay: 0.0}}
  loss: {{perceptual_pretrained: false, repa_encoder: tiny, repa_pretrained: false}}
"""


def _real_peak(recipe: Path) -> int:
    # A fixed mmap threshold makes freed large blocks leave the process at once, so the high-water
    # mark follows live tensors instead of glibc's adaptive heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _REAL_STEP, str(recipe)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize("template, sizes", [
    (GPT_RECIPE, [dict(dim=128, batch=16), dict(dim=256, batch=32)]),
    (TOKENIZER_RECIPE, [dict(dim=64, batch=4), dict(dim=128, batch=8)]),
], ids=["gpt", "tokenizer"])
def test_estimate_matches_real_cpu_step(tmp_path: Path, template: str, sizes: list[dict]) -> None:
    for size in sizes:
        path = tmp_path / f"recipe_{size['dim']}.yaml"
        path.write_text(template.format(**size))
        recipe = load_recipe(path)
        estimate = breakdown(recipe, Activations(recipe, precision="fp32"), gpus=1, accum=1, fsdp=False, ac=False)
        real = _real_peak(path)
        assert real > 100 * 2**20, f"too small to measure against RSS noise: {real / 2**20:.0f} MiB"
        assert abs(estimate.peak - real) <= 0.2 * real, (size, estimate.rows, real)


def test_cli_prints_the_verdict_for_the_xl_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    text = main(["--config", str(ROOT / "configs/ar/gpt_xl.yaml"), "--gpus", "8", "--gpu-memory", "80"])
    assert capsys.readouterr().out.strip() == text
    verdict = [line for line in text.splitlines() if line.startswith("fits: ")]
    assert len(verdict) == 1 and verdict[0].startswith("fits: yes"), text
    assert "faster:" not in text  # XL needs its activation checkpointing on 8 x 80 GB


def test_cli_says_when_activation_checkpointing_is_not_needed(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(GPT_RECIPE.format(dim=256, batch=32).replace("precision: fp32", "precision: fp32, "
                                                                  "activation_checkpointing: true"))
    text = main(["--config", str(path), "--gpus", "1", "--gpu-memory", "80"])
    assert "fits: yes" in text and "activation_checkpointing true" in text, text
    assert "faster: it also fits without activation checkpointing" in text, text
    recipe = load_recipe(path)
    acts = Activations(recipe)
    with_ac, without = (breakdown(recipe, acts, gpus=1, accum=1, fsdp=False, ac=ac).peak for ac in (True, False))
    assert without > 1.5 * with_ac
    between = ((with_ac + without) / 2 / 2**30 + 1) / 0.9  # usable memory = 90 % of the GPU less 1 GiB
    text = main(["--config", str(path), "--gpus", "1", "--gpu-memory", f"{between:.4f}"])
    assert "fits: yes" in text and "faster:" not in text, text


def test_cli_names_a_change_when_the_recipe_does_not_fit(tmp_path: Path) -> None:
    # Logits of a 16k vocabulary dominate: 64 sequences need more than 1 GiB, 8 do not.
    path = tmp_path / "big_logits.yaml"
    path.write_text("model: {dim: 64, n_layer: 2, n_head: 4, vocab_size: 16384, block_size: 256, num_classes: 10}\n"
                    "train: {global_batch_size: 64}\n")
    text = main(["--config", str(path), "--gpus", "1", "--gpu-memory", "2"])
    assert "fits: no" in text
    assert "suggest: set train.grad_accum_steps: " in text, text


def test_missing_or_wrong_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    model_only = tmp_path / "model.yaml"
    model_only.write_text("dim: 64\n")
    with pytest.raises(UserError, match="no 'model' entry"):
        load_recipe(model_only)
