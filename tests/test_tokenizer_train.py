"""tokenizer.train: recipe loading, the objective's terms, and end-to-end runs (bad files, GAN, exact resume)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.extraction_testing import REPO, free_port, make_image_folder, make_tokenizer, run_module
from tokenizer.config import TOKENIZER_PRESETS
from tokenizer.flow import clean_estimate, flow_loss, interpolate, target_velocity
from tokenizer.losses import (
    DISCRIMINATOR_PRESETS,
    LPIPS,
    REPA_ENCODER_PRESETS,
    PatchGANDiscriminator,
    RepaFeatureExtractor,
    repa_loss,
)
from tokenizer.model import DARTokenizer
from tokenizer.losses import LossNetworks, loss_terms, term_weights, total_loss
from tokenizer.train import LossConfig, check_settings, load_train_config, parse_args
from utils.checkpoint import CheckpointManager, safe_torch_load
from utils.config import ConfigError
from utils.distributed import DistEnv
from utils.run import read_metrics
from utils.training import save_train_checkpoint

TINY = REPO / "configs" / "tokenizer" / "train_tiny.yaml"


def write_recipe(path: Path, **train_overrides: object) -> Path:
    """train_tiny.yaml with ``train:`` fields replaced (nested dicts merge one level)."""
    recipe = yaml.safe_load(TINY.read_text())
    recipe["model"] = "tiny"
    for key, value in train_overrides.items():
        if isinstance(value, dict):
            recipe["train"].setdefault(key, {}).update(value)
        else:
            recipe["train"][key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_args(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(recipe), "--data-path", str(data), "--results-dir", str(out), "--device", "cpu", *extra]


def losses_by_step(run: Path) -> dict[int, dict[str, float]]:
    """Every logged term per step (throughput aside, which depends on the machine)."""
    return {r["step"]: {k: v for k, v in r.items() if k != "images_per_s"}
            for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


# ------------------------------------------------------------------------------------------------ recipes


def test_recipes_load_strictly_and_resolve_the_model_yaml() -> None:
    v1 = load_train_config(REPO / "configs" / "tokenizer" / "train_v1.yaml")
    assert v1.model == TOKENIZER_PRESETS["v1"]
    assert (v1.train.optim.lr, v1.train.optim.betas, v1.train.optim.warmup_steps) == (2e-4, (0.9, 0.95), 500)
    assert (v1.train.optim.ema_decay, v1.train.optim.grad_clip, v1.train.global_batch_size) == (0.999, 1.0, 512)
    assert (v1.train.loss.perceptual_weight, v1.train.loss.repa_weight, v1.train.loss.gan_weight) == (0.5, 0.5, 0.0)
    assert v1.train.loss.perceptual_pretrained and v1.train.loss.repa_pretrained
    tiny = load_train_config(TINY)
    assert tiny.model == TOKENIZER_PRESETS["tiny"]


def test_unknown_keys_and_bad_model_entries_are_errors(tmp_path: Path) -> None:
    recipe = yaml.safe_load(TINY.read_text())
    recipe["model"] = "tiny"
    recipe["train"]["loss"]["lpips_weight"] = 0.5
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="lpips_weight"):
        load_train_config(tmp_path / "typo.yaml")
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"model": "tiny", "optim": {}}))
    with pytest.raises(ConfigError, match="optim"):
        load_train_config(tmp_path / "extra.yaml")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({"model": "no_such_model.yaml"}))
    with pytest.raises(ConfigError, match="no_such_model"):
        load_train_config(tmp_path / "missing.yaml")


def test_the_removed_flow_draws_option_is_an_unknown_key(tmp_path: Path) -> None:
    recipe = yaml.safe_load(TINY.read_text())
    recipe["train"]["flow_draws"] = 2
    (tmp_path / "draws.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="flow_draws"):
        load_train_config(tmp_path / "draws.yaml")


def test_model_preset_with_nested_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "num_encoder_layers": 3,
                                              "diff_decoder": {"grad_checkpointing": True}}}))
    cfg = load_train_config(path)
    assert cfg.model.num_encoder_layers == 3 and cfg.model.diff_decoder.grad_checkpointing
    assert cfg.model.diff_decoder.depth == TOKENIZER_PRESETS["tiny"].diff_decoder.depth


def test_cli_flags_override_single_fields() -> None:
    cfg, opts = parse_args(["--config", str(TINY), "--data-path", "imgs", "--results-dir", "out", "--lr", "3e-4",
                            "--perceptual-weight", "0", "--repa-weight", "0", "--gan-weight", "0.5",
                            "--max-steps", "7", "--grad-checkpointing", "on", "--dinov2-weights", "d.pth"])
    t = cfg.train
    assert (t.optim.lr, t.loss.perceptual_weight, t.loss.repa_weight, t.loss.gan_weight) == (3e-4, 0.0, 0.0, 0.5)
    assert t.max_steps == 7 and t.data.data_path == "imgs" and opts.weights.dinov2 == "d.pth"
    assert cfg.model.grad_checkpointing and cfg.model.diff_decoder.grad_checkpointing
    assert t.optim.warmup_steps == load_train_config(TINY).train.optim.warmup_steps  # untouched fields stay


# ------------------------------------------------------------------------------------------------ loss terms


def test_flow_loss_is_zero_for_the_true_velocity_and_scaled_mse_otherwise() -> None:
    torch.manual_seed(0)
    x1, x0, t = torch.randn(3, 3, 8, 8) * 0.6, torch.randn(3, 3, 8, 8), torch.rand(3)
    target = target_velocity(x0, x1)
    assert flow_loss(target, target, 0.6)["flow"].item() == 0.0
    off = target + 0.3
    torch.testing.assert_close(flow_loss(off, target, 0.6)["flow"], torch.tensor(0.09 / 0.36))
    # The true velocity's clean-image estimate is the data point itself (what LPIPS / GAN see).
    torch.testing.assert_close(clean_estimate(interpolate(x0, x1, t), target, t), x1, atol=1e-5, rtol=0)


def test_vq_terms_vanish_when_latents_sit_on_codes() -> None:
    model = DARTokenizer(TOKENIZER_PRESETS["tiny"])
    codebook = model.quantize.codebook()
    z = codebook[torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])]  # (B, n, d) exactly on codes
    _, z_norm, z_q = model.quantize(z)
    losses = model.quantize.losses(z_norm, z_q, torch.tensor([4, 2]))
    assert losses["codebook"].item() == pytest.approx(0.0, abs=1e-12)
    assert losses["commitment"].item() == pytest.approx(0.0, abs=1e-12)


def test_codebook_entropy_term_rewards_spread_and_confident_assignments() -> None:
    model = DARTokenizer(TOKENIZER_PRESETS["tiny"])
    codebook = model.quantize.codebook().detach()
    quantize = model.quantize
    # Every latent on its own code, sharp temperature: per-token entropy ~0, batch entropy log(8).
    spread = codebook[torch.arange(8)][None]
    assert quantize.entropy_loss(spread, 1e-4).item() == pytest.approx(-math.log(8), abs=1e-3)
    # All latents on one code: nothing is spread, so the term is ~0 (its maximum for confident tokens).
    collapsed = codebook[torch.zeros(1, 8, dtype=torch.long)]
    assert quantize.entropy_loss(collapsed, 1e-4).item() == pytest.approx(0.0, abs=1e-3)
    # A soft temperature raises per-token entropy; gradients reach both latents and codebook.
    z = torch.nn.functional.normalize(torch.randn(2, 5, codebook.shape[1]), dim=-1).requires_grad_(True)
    loss = quantize.entropy_loss(z, 0.5)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and quantize.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature must be positive"):
        quantize.entropy_loss(z, 0.0)


def test_entropy_term_is_on_only_with_a_positive_weight() -> None:
    torch.manual_seed(0)
    model = DARTokenizer(TOKENIZER_PRESETS["tiny"]).train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert "entropy" not in model(images).losses
    out = model(images, entropy_temperature=0.01)
    weights = term_weights(LossConfig(perceptual_weight=0.0, repa_weight=0.0, entropy_weight=0.1))
    terms = loss_terms(out, images, LossNetworks(None, None, None), weights, use_gan=False)
    assert set(terms) == {"flow", "codebook", "commitment", "entropy"}
    loss = total_loss(terms, weights, adaptive=False, last_layer=None)[0]
    expected = terms["flow"] + terms["codebook"] + terms["commitment"] + 0.1 * terms["entropy"]
    torch.testing.assert_close(loss, expected)
    cfg, _ = parse_args(["--config", str(TINY), "--data-path", "imgs", "--results-dir", "out",
                         "--entropy-weight", "0.2"])
    assert cfg.train.loss.entropy_weight == 0.2
    with pytest.raises(ValueError, match="entropy_temperature"):
        check_settings(replace(cfg, train=replace(cfg.train, loss=replace(cfg.train.loss, entropy_temperature=0.0))))


def test_pixel_term_is_the_clean_image_mse_and_on_only_with_a_positive_weight() -> None:
    torch.manual_seed(0)
    model = DARTokenizer(TOKENIZER_PRESETS["tiny"]).train()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(images)
    nets = LossNetworks(None, None, None)
    assert "pixel" not in loss_terms(out, images, nets, term_weights(LossConfig(perceptual_weight=0.0)), False)
    weights = term_weights(LossConfig(perceptual_weight=0.0, repa_weight=0.0, pixel_weight=2.0))
    terms = loss_terms(out, images, nets, weights, use_gan=False)
    assert set(terms) == {"flow", "codebook", "commitment", "pixel"}
    # The predicted clean image is x_t + (1 - t)·v back in image units; the term is its MSE to the input.
    t = out.t.view(-1, 1, 1, 1)
    clean = (out.x_t + (1 - t) * out.velocity) / model.config.diff_decoder.data_std
    expected = ((clean - images) ** 2).mean()
    torch.testing.assert_close(terms["pixel"], expected)
    loss = total_loss(terms, weights, adaptive=False, last_layer=None)[0]
    torch.testing.assert_close(loss, terms["flow"] + terms["codebook"] + terms["commitment"] + 2.0 * expected)
    # It has a gradient of its own (at init only the zero-initialised output layer receives one).
    model.zero_grad()
    terms["pixel"].backward()
    assert model.pixel_decoder.conv_out.weight.grad.abs().sum() > 0
    cfg, _ = parse_args(["--config", str(TINY), "--data-path", "imgs", "--results-dir", "out", "--pixel-weight", "4"])
    assert cfg.train.loss.pixel_weight == 4.0
    with pytest.raises(ValueError, match="pixel_weight"):
        check_settings(replace(cfg, train=replace(cfg.train, loss=replace(cfg.train.loss, pixel_weight=-1.0))))


def _tiny_forward(batch: int = 2) -> tuple[DARTokenizer, torch.Tensor, object]:
    torch.manual_seed(0)
    model = DARTokenizer(TOKENIZER_PRESETS["tiny"]).train()
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    return model, images, model(images)


def test_loss_terms_are_named_and_switched_by_their_weights() -> None:
    model, images, out = _tiny_forward()
    weights = term_weights(LossConfig(perceptual_weight=0.0, repa_weight=0.0))
    terms = loss_terms(out, images, LossNetworks(None, None, None), weights, use_gan=False)
    assert set(terms) == {"flow", "codebook", "commitment"}
    disc = PatchGANDiscriminator(DISCRIMINATOR_PRESETS["tiny"])
    nets = LossNetworks(LPIPS(pretrained=False), None, disc)
    weights = term_weights(LossConfig(repa_weight=0.0, gan_weight=0.5))
    terms = loss_terms(out, images, nets, weights, use_gan=True)
    assert set(terms) == {"flow", "codebook", "commitment", "lpips", "gan"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in terms.values())
    # The generator step leaves the discriminator trainable (its own step comes next) and gradient-free.
    total_loss(terms, weights, adaptive=False, last_layer=None)[0].backward()
    assert all(p.requires_grad and p.grad is None for p in disc.parameters())
    assert model.pixel_decoder.conv_out.weight.grad is not None


def test_total_loss_weights_each_term() -> None:
    terms = {k: torch.tensor(v) for k, v in
             {"flow": 1.0, "codebook": 2.0, "commitment": 3.0, "lpips": 4.0, "repa": 5.0, "gan": 6.0}.items()}
    weights = {"flow": 1.0, "codebook": 1.0, "commitment": 1.0, "lpips": 0.5, "repa": 0.5, "gan": 0.25}
    loss, balance = total_loss(terms, weights, adaptive=False, last_layer=None)
    assert loss.item() == pytest.approx(1 + 2 + 3 + 2 + 2.5 + 1.5) and balance is None
    no_gan = {k: v for k, v in terms.items() if k != "gan"}
    assert total_loss(no_gan, weights, adaptive=False, last_layer=None)[0].item() == pytest.approx(10.5)


def test_adaptive_gan_weight_balances_gradient_norms_at_the_last_layer() -> None:
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    terms = {"flow": (layer * 3.0).sum(), "codebook": torch.tensor(0.0), "commitment": torch.tensor(0.0),
             "gan": (layer * 0.5).sum()}
    weights = {"flow": 1.0, "codebook": 1.0, "commitment": 1.0, "lpips": 0.0, "repa": 0.0, "gan": 0.5}
    loss, balance = total_loss(terms, weights, adaptive=True, last_layer=layer)
    # ||d flow / d layer|| / ||d gan / d layer|| = 3 / 0.5 = 6 (up to the 1e-4 guard).
    assert balance.item() == pytest.approx(6.0, rel=1e-3)
    loss.backward()
    torch.testing.assert_close(layer.grad, torch.full((2,), 3.0 + 0.5 * balance.item() * 0.5))
    # The pixel term counts as reconstruction too: (3 + 2·1) / 0.5 = 10.
    terms = {"flow": (layer * 3.0).sum(), "pixel": layer.sum(), "gan": (layer * 0.5).sum()}
    _, balance = total_loss(terms, {**weights, "pixel": 2.0}, adaptive=True, last_layer=layer)
    assert balance.item() == pytest.approx(10.0, rel=1e-3)


# ------------------------------------------------------------------------------------------------ runs


def _bad_files(root: Path) -> None:
    """Eight good noise images plus one file of each kind the loader converts or skips."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / f"ok_{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "x_gray.png")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(root / "x_cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(root / "x_rgba.png")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "x_16bit.png")
    Image.fromarray(rng.integers(0, 256, (12, 40, 3), dtype=np.uint8)).save(root / "x_small.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "x_trunc.jpg")
    data = (root / "x_trunc.jpg").read_bytes()
    (root / "x_trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "x_text.jpg").write_text("not an image")


def test_bad_files_are_skipped_counted_and_reported_and_checkpoints_load(tmp_path: Path) -> None:
    _bad_files(tmp_path / "images")
    # Batch 1: every skipped file is an empty batch, which the loop must pass over.
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=1, max_steps=13, ckpt_every=13, sample_every=13,
                          data={"min_size": 16})
    out = tmp_path / "run"
    result = run_module("tokenizer.train", train_args(recipe, tmp_path / "images", out, "--perceptual-weight", "0"))
    records = read_metrics(out / "metrics.jsonl")
    (epoch_end,) = [r for r in records if "epoch_end" in r]
    assert epoch_end["bad_files/seen"] == 15 and epoch_end["bad_files/skipped"] == 3
    assert (epoch_end["bad_files/skipped/truncated"], epoch_end["bad_files/skipped/not_image"],
            epoch_end["bad_files/skipped/too_small"]) == (1, 1, 1)
    assert epoch_end["bad_files/converted/grayscale"] == 2  # the gray PNG and the 16-bit one
    assert (epoch_end["bad_files/converted/cmyk"], epoch_end["bad_files/converted/rgba"],
            epoch_end["bad_files/converted/16bit"]) == (1, 1, 1)
    assert "3 skipped" in result.stderr and "truncated 1" in result.stderr
    last = records[-1]
    assert last["step"] == 13 and last["empty_batches"] >= 3 and np.isfinite(last["loss"])
    assert set(last) >= {"flow", "codebook", "commitment", "repa", "lr", "grad_norm", "images_per_s", "epoch"}
    # Run folder contract: resolved config, grids, final export, and checkpoints from_pretrained reads.
    assert load_train_config(out / "config.yaml").model == TOKENIZER_PRESETS["tiny"]
    assert (out / "samples" / "step_0000013.png").is_file()
    checkpoint = out / "checkpoints" / "step_0000013.pt"
    ema_state = safe_torch_load(checkpoint)["modules"]["ema"]
    for loaded in (DARTokenizer.from_pretrained(checkpoint), DARTokenizer.from_pretrained(out / "final")):
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, ema_state[key], rtol=0, atol=0)
    # The shared export rule: final/ is the EMA (what to sample with), final_raw/ the trained weights.
    raw_state = safe_torch_load(checkpoint)["modules"]["model"]
    for key, value in DARTokenizer.from_pretrained(out / "final_raw").state_dict().items():
        torch.testing.assert_close(value, raw_state[key], rtol=0, atol=0)


def test_gan_turns_on_at_its_start_step_with_the_adaptive_weight(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", per_class=(4, 4), bad=None)
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=2, max_steps=3, ckpt_every=3,
                          loss={"gan_weight": 0.5, "gan_start_step": 1, "adaptive_gan_weight": True,
                                "perceptual_weight": 0.0})
    out = tmp_path / "run"
    run_module("tokenizer.train", train_args(recipe, tmp_path / "images", out))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert "gan" not in records[0] and "disc" not in records[0]
    assert all({"gan", "disc", "gan_balance", "disc_lr"} <= set(r) for r in records[1:])
    assert "disc" in safe_torch_load(out / "checkpoints" / "step_0000003.pt")["modules"]


def _launch(args: list[str], nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "tokenizer.train", *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.mark.slow
def test_two_rank_run_learns_and_a_killed_run_resumes_exactly(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", per_class=(6, 6), bad="c1/img_003.png")
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=4, max_steps=8, ckpt_every=3, sample_every=100)
    full = tmp_path / "full"
    run_module("tokenizer.train", train_args(recipe, tmp_path / "images", full), nproc=2)
    reference = losses_by_step(full)
    assert sorted(reference) == list(range(1, 9))
    loss = {step: record["loss"] for step, record in reference.items()}
    assert np.mean([loss[s] for s in (6, 7, 8)]) < np.mean([loss[s] for s in (1, 2, 3)])

    # Kill the whole torchrun process group as soon as the first checkpoint exists, then resume.
    killed = tmp_path / "killed"
    process = _launch(train_args(recipe, tmp_path / "images", killed), nproc=2)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").is_file():
        assert process.poll() is None, process.stderr.read().decode()[-4000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    run_module("tokenizer.train", train_args(recipe, tmp_path / "images", killed, "--resume", "auto"), nproc=2)
    assert losses_by_step(killed) == reference
    assert read_metrics(killed / "metrics.jsonl") != [] and (killed / "final").is_dir()


def test_init_from_starts_fine_tuning_from_the_given_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizer.train import main

    make_image_folder(tmp_path / "images", per_class=(2, 2), bad=None)
    source = make_tokenizer(tmp_path / "source")
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=2, max_steps=1, loss={"perceptual_weight": 0.0})
    out = tmp_path / "run"
    # No optimizer step (--lr 0 is refused): the weights (and so the EMA) stay exactly where --init-from put them.
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    main(*parse_args(train_args(recipe, tmp_path / "images", out, "--init-from", str(source))))
    expected = DARTokenizer.from_pretrained(source).state_dict()
    for key, value in DARTokenizer.from_pretrained(out / "final").state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_checkpoint_aliases_may_not_replace_training_entries(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(KeyError, match="step"):
        save_train_checkpoint(manager, env, 1, {}, {}, {}, aliases={"step": 0})
    assert manager.latest() is None


@pytest.mark.slow
def test_launch_scripts_train_and_reconstruct(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", per_class=(2, 2), bad=None)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1",
           "DATA_PATH": str(tmp_path / "images"), "CONFIG": "configs/tokenizer/train_tiny.yaml",
           "RESULTS_DIR": str(tmp_path / "run"), "CKPT": str(tmp_path / "run" / "final"),
           "OUT": str(tmp_path / "recon.npz"),
           "PYTHON": sys.executable}  # the interpreter running the tests, whatever PATH holds
    env.pop("PYTHONPATH", None)  # the launchers must not need it
    for script, extra in (("train_tokenizer.sh", ["--max-steps", "2", "--global-batch-size", "2", "--perceptual-weight", "0"]),
                          ("reconstruct.sh", ["--image-size", "32", "--steps", "4", "--num-workers", "0"])):
        env["MASTER_PORT"] = str(free_port())
        result = subprocess.run(["bash", str(REPO / "scripts" / script), "--device", "cpu", *extra], env=env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(losses_by_step(tmp_path / "run")) == [1, 2]
    assert np.load(tmp_path / "recon.npz")["arr_0"].shape == (4, 32, 32, 3)
    assert "PSNR" in result.stdout


def _nan_on_calls(monkeypatch: pytest.MonkeyPatch, calls: set[int] | None) -> None:
    """Make the objective's total loss NaN on the given 1-based calls (None: on every call)."""
    import tokenizer.losses as objective

    original, count = objective.total_loss, [0]

    def poisoned(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        count[0] += 1
        loss, balance = original(*args, **kwargs)
        return (loss * float("nan") if calls is None or count[0] in calls else loss), balance

    monkeypatch.setattr(objective, "total_loss", poisoned)


def test_non_finite_steps_are_skipped_then_the_run_aborts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizer.train import main

    make_image_folder(tmp_path / "images", per_class=(2, 2), bad=None)
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=2, max_steps=3, loss={"perceptual_weight": 0.0})
    _nan_on_calls(monkeypatch, {2})
    main(*parse_args(train_args(recipe, tmp_path / "images", tmp_path / "once", "--max-bad-steps", "2")))
    records = [r for r in read_metrics(tmp_path / "once" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] == "nan" for r in records] == [False, True, False]
    assert records[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in DARTokenizer.from_pretrained(tmp_path / "once" / "final").state_dict().values())
    _nan_on_calls(monkeypatch, None)
    with pytest.raises(FloatingPointError, match="max-bad-steps=2"):
        main(*parse_args(train_args(recipe, tmp_path / "images", tmp_path / "always", "--max-bad-steps", "2")))


def _per_image_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make each image's flow draws (and every per-batch statistic) a function of that image alone, so that
    splitting a step's images into micro-batches cannot change them."""
    import zlib

    original = DARTokenizer.forward

    def forward(self: DARTokenizer, images: torch.Tensor, generator: object = None, **kwargs: object) -> object:
        outs = [original(self, image[None], generator=torch.Generator().manual_seed(
            zlib.crc32(image.detach().cpu().numpy().tobytes())), **kwargs) for image in images]
        cat = {name: torch.cat([getattr(o, name) for o in outs]) for name in
               ("codes", "velocity", "target", "x_t", "t", "u", "window_start", "prefix_len", "clean_image")}
        losses = {k: torch.stack([o.losses[k] for o in outs]).mean() for k in outs[0].losses}
        return replace(outs[0], losses=losses, repa=None, **cat)

    monkeypatch.setattr(DARTokenizer, "forward", forward)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizer.train import main

    _per_image_draws(monkeypatch)
    make_image_folder(tmp_path / "images", per_class=(4, 4), bad=None)
    recipe = write_recipe(tmp_path / "r.yaml", global_batch_size=4, max_steps=4, ckpt_every=4, sample_every=100,
                          log_every=1, data={"min_crop_frac": 1.0, "max_crop_frac": 1.0, "flip": False},
                          loss={"perceptual_weight": 0.0, "repa_weight": 0.0, "pixel_weight": 1.0,
                                "entropy_weight": 0.1, "gan_weight": 0.5, "gan_start_step": 1})
    runs = {}
    for accum in (1, 2):
        main(*parse_args(train_args(recipe, tmp_path / "images", tmp_path / f"accum{accum}",
                                    "--grad-accum-steps", str(accum))))
        runs[accum] = [r for r in read_metrics(tmp_path / f"accum{accum}" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in runs[2]] == [r["step"] for r in runs[1]] == [1, 2, 3, 4]
    for big, split in zip(runs[1], runs[2]):
        assert set(big) == set(split)
        keys = ["loss", "flow", "pixel", "entropy", "codebook", "grad_norm", "epoch"]
        keys += ["gan", "disc"] if big["step"] > 1 else []  # the GAN starts after step 1
        for key in keys:
            assert split[key] == pytest.approx(big[key], rel=1e-4, abs=1e-6), (big["step"], key)
    a = DARTokenizer.from_pretrained(tmp_path / "accum1" / "final").state_dict()
    b = DARTokenizer.from_pretrained(tmp_path / "accum2" / "final").state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        main(*parse_args(train_args(recipe, tmp_path / "images", tmp_path / "bad", "--grad-accum-steps", "3")))


def test_missing_loss_network_weights_name_the_flags(tmp_path: Path) -> None:
    from tokenizer.train import main
    from utils.hub import WeightsNotFoundError

    make_image_folder(tmp_path / "images", per_class=(2,), bad=None)
    recipe = write_recipe(tmp_path / "r.yaml", loss={"perceptual_pretrained": True})
    argv = train_args(recipe, tmp_path / "images", tmp_path / "run", "--vgg-weights", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsNotFoundError, match=r"--perceptual-weight 0(.|\n)*--vgg-weights"):
        main(*parse_args(argv))



def test_training_images_leave_the_workers_as_uint8_and_reach_the_model_unchanged(tmp_path: Path) -> None:
    # A quarter of the bytes to pin and copy to the GPU; the device-side conversion must give the float
    # tensor the transform would have produced, so training is unchanged.
    from dataset.images import RandomCropFlip, to_model_range
    from tokenizer.train import build_data

    cfg, _ = parse_args(train_args(write_recipe(tmp_path / "recipe.yaml"), make_image_folder(tmp_path / "images"),
                                   tmp_path / "run"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    t = replace(cfg.train, global_batch_size=4)
    dataset, _, _ = build_data(t, env, 4)
    transform = dataset.transform
    assert isinstance(transform, RandomCropFlip) and transform.uint8
    as_float = replace(transform, uint8=False)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    out = transform(picture, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8
    assert torch.equal(to_model_range(out), as_float(picture, torch.Generator().manual_seed(3)))
