"""autoregressive.train: recipes load strictly, training from extracted codes learns, resume is exact."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from autoregressive import GPT
from autoregressive.train import ARTrainConfig, load_ar_config, main, parse_args, resolve_schedule
from dataset.codes import read_manifest
from tests.extraction_testing import IMAGE_SIZE, REPO, free_port, make_image_folder, make_tokenizer, run_module
from tokenizer.extract_codes import main as extract_main
from tokenizer.extract_codes import parse_args as extract_args
from utils.checkpoint import safe_torch_load
from utils.config import ConfigError, load_yaml
from utils.run import read_metrics
from utils.training import learning_rate

TINY = str(REPO / "configs" / "ar" / "tiny.yaml")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """30 images (one bad) → 29 rows of flip-augmented codes from a random tiny tokenizer."""
    root = tmp_path_factory.mktemp("ar")
    images = make_image_folder(root / "images", per_class=(10, 10, 10), bad="c2/img_004.png")
    tokenizer = make_tokenizer(root / "tokenizer")
    codes = root / "codes"
    extract_main(extract_args(["--tokenizer-ckpt", str(tokenizer), "--data-path", str(images), "--out", str(codes),
                               "--image-size", str(IMAGE_SIZE), "--flip", "--shard-size", "16", "--num-workers", "0",
                               "--device", "cpu"]))
    return {"images": images, "tokenizer": tokenizer, "codes": codes}


def train_args(codes: Path, results: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--code-path", str(codes), "--results-dir", str(results), "--device", "cpu", *extra]


def losses(results: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(results / "metrics.jsonl")]


def test_paper_recipes_load_and_resolve_the_schedule() -> None:
    cfg = load_ar_config(REPO / "configs" / "ar" / "gpt_l.yaml")
    t = cfg.train
    assert (t.global_batch_size, t.epochs, t.decay_epochs) == (1024, 300, 50)
    assert (t.optim.lr, t.optim.betas, t.optim.weight_decay, t.optim.grad_clip) == (4e-4, (0.9, 0.95), 0.05, 1.0)
    assert cfg.model.dim == 1024 and cfg.model.n_layer == 24
    # ImageNet train (1,281,167 images) at batch 1024: 1251 steps per epoch.
    resolved = resolve_schedule(t, steps_per_epoch=1251)
    assert resolved.max_steps == 300 * 1251 and resolved.optim.decay_start_step == 250 * 1251
    lr = [learning_rate(s, resolved.max_steps, resolved.optim) for s in (0, 250 * 1251 - 1, resolved.max_steps - 1)]
    assert lr[0] == lr[1] == 4e-4 and lr[2] == pytest.approx(1e-5, rel=1e-3)
    # A hand-set decay start must agree with decay_epochs (a run's resolved config.yaml does).
    with pytest.raises(ConfigError, match="decay_start_step 5 disagrees"):
        resolve_schedule(dataclasses.replace(t, optim=dataclasses.replace(t.optim, decay_start_step=5)), 1251)
    assert resolve_schedule(resolved, steps_per_epoch=1251) == resolved
    for name in ("gpt_b", "gpt_xl", "gpt_xxl", "tiny"):
        assert isinstance(load_ar_config(REPO / "configs" / "ar" / f"{name}.yaml"), ARTrainConfig)


@pytest.mark.parametrize("change, match", [
    ({"train": {"global_batch_size": 8, "learning_rate": 1e-4}}, "learning_rate"),
    ({"optimizer": {}}, "optimizer"),
    ({"train": {"data": {"codes": "x"}}}, "codes"),
])
def test_unknown_or_derived_config_keys_are_errors(tmp_path: Path, change: dict, match: str) -> None:
    data = load_yaml(TINY)
    for key, value in change.items():
        data[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        load_ar_config(path)


def test_cli_overrides_and_source_checks(assets: dict[str, Path], tmp_path: Path) -> None:
    cfg, opts = parse_args(train_args(assets["codes"], tmp_path, "--lr", "3e-4", "--global-batch-size", "4",
                                      "--ema-decay", "0", "--stop-after-step", "2"))
    assert cfg.train.optim.lr == 3e-4 and cfg.train.global_batch_size == 4 and cfg.train.optim.ema_decay == 0
    assert cfg.train.data.code_path == str(assets["codes"]) and opts.stop_after_step == 2
    with pytest.raises(ValueError, match="exactly one data source"):
        main(dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, data=dataclasses.replace(cfg.train.data, code_path=None))), opts)
    with pytest.raises(ValueError, match="needs --tokenizer-ckpt"):
        main(*parse_args(["--config", TINY, "--data-path", str(assets["images"]), "--results-dir", str(tmp_path)]))


def test_single_process_training_exports_loadable_weights(assets: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "run"
    run_module("autoregressive.train", train_args(assets["codes"], results, "--max-steps", "6", "--ckpt-every", "4"))
    saved = load_yaml(results / "config.yaml")
    # 29 rows at batch 8: 3 steps per epoch; max_steps 6 and 10 decay epochs → decay from step 0.
    assert saved["train"]["max_steps"] == 6 and saved["train"]["optim"]["decay_start_step"] == 0
    assert saved["train"]["precision"] == "fp32" and saved["model"]["vocab_size"] == 64
    reloaded = load_ar_config(results / "config.yaml")  # a run's resolved config is a valid recipe
    assert dataclasses.asdict(resolve_schedule(reloaded.train, steps_per_epoch=3)) == dataclasses.asdict(reloaded.train)
    assert [s for s, _ in losses(results)] == list(range(1, 7))
    # The test codes hold the centre crop and its mirror: the log says they are not the paper's ten crops.
    assert "2 view(s) per image (the centre crop and its mirror)" in (results / "log.txt").read_text()
    path = results / "checkpoints" / "step_0000006.pt"
    checkpoint = safe_torch_load(path)
    # final/ holds the weights to sample with (the EMA: the tiny recipe keeps one), final_raw/ the trained ones.
    for folder, module in (("final", "ema"), ("final_raw", "model")):
        for model in (GPT.from_pretrained(results / folder), GPT.from_pretrained(path, ema=module == "ema")):
            assert model.config == load_ar_config(TINY).model
            for key, value in model.state_dict().items():
                torch.testing.assert_close(value, checkpoint["modules"][module][key], rtol=0, atol=0)
        # The from_pretrained aliases are the same storage as the training state: written once.
        key = "layers.0.attention.wqkv.weight"
        assert checkpoint[module][key].untyped_storage().data_ptr() == \
            checkpoint["modules"][module][key].untyped_storage().data_ptr()
    # A fresh start must not overwrite an existing run.
    with pytest.raises(FileExistsError, match="--resume auto"):
        main(*parse_args(train_args(assets["codes"], results, "--max-steps", "6")))


def test_on_the_fly_encoding_trains_and_skips_bad_files(assets: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "run"
    out = main(*parse_args(["--config", TINY, "--data-path", str(assets["images"]), "--tokenizer-ckpt",
                            str(assets["tokenizer"]), "--results-dir", str(results), "--device", "cpu",
                            "--max-steps", "4", "--global-batch-size", "6"]))
    assert out["step"] == 4
    records = read_metrics(results / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 10 and r["grad_norm"] > 0 for r in records)


# 29 rows over 2 ranks at global batch 8: 14 per rank, 3 steps per epoch. The resume point, step 5,
# is mid-epoch and mid-schedule (the linear decay spans all 24 steps).
TWO_RANK = ["--max-steps", "24", "--ckpt-every", "5", "--keep-last", "10"]


@pytest.fixture(scope="module")
def ddp_reference(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank gloo DDP run of 24 steps."""
    whole = tmp_path_factory.mktemp("ddp") / "whole"
    run_module("autoregressive.train", train_args(assets["codes"], whole, *TWO_RANK), nproc=2)
    return whole


def killed_copy(whole: Path, cut: Path) -> Path:
    """What a run killed during step 8 leaves: the step-5 checkpoint and metrics up to a torn step-8 line."""
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step_0000005.pt", cut / "checkpoints")
    (cut / "checkpoints" / "latest").write_text("step_0000005.pt\n")
    lines = (whole / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(lines[:7]) + '{"step": 8, "lo')
    return cut


def assert_same_weights(a: Path, b: Path, exact: bool = True) -> None:
    sa, sb = GPT.from_pretrained(a).state_dict(), GPT.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], **({"rtol": 0, "atol": 0} if exact else {}))


@pytest.mark.slow
def test_two_rank_training_learns_and_resumes_exactly(assets: dict[str, Path], ddp_reference: Path,
                                                      tmp_path: Path) -> None:
    reference = losses(ddp_reference)
    assert [s for s, _ in reference] == list(range(1, 25))
    first, last = reference[0][1], sum(loss for _, loss in reference[-3:]) / 3
    assert last < first - 0.5, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    cut = killed_copy(ddp_reference, tmp_path / "cut")
    run_module("autoregressive.train", train_args(assets["codes"], cut, *TWO_RANK, "--resume", "auto"), nproc=2)
    assert losses(cut) == reference
    assert_same_weights(ddp_reference / "final", cut / "final")


def read_sharded(folder: Path, scratch: Path) -> dict:
    """A sharded checkpoint as one dict in the single-file layout (optimizer states keyed by position)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    state = {**safe_torch_load(folder / "train_state.pt"), **safe_torch_load(scratch)}  # tensors over the name lists
    optimizer = state["optimizers"]["optimizer"]
    position = {name: i for i, name in enumerate(n for g in optimizer["param_groups"] for n in g["params"])}
    state["optimizers"]["optimizer"] = {
        "state": {position[name]: value for name, value in optimizer["state"].items()},
        "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in optimizer["param_groups"]],
    }
    return state


@pytest.mark.slow
def test_fsdp_resumes_a_ddp_checkpoint_and_trains_like_ddp(assets: dict[str, Path], ddp_reference: Path,
                                                           tmp_path: Path) -> None:
    cut = killed_copy(ddp_reference, tmp_path / "cut")
    run_module("autoregressive.train", train_args(assets["codes"], cut, *TWO_RANK, "--resume", "auto", "--fsdp"),
               nproc=2)
    reference = losses(ddp_reference)
    ours = losses(cut)
    assert [s for s, _ in ours] == [s for s, _ in reference]
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in reference], rel=1e-5)
    assert_same_weights(ddp_reference / "final", cut / "final", exact=False)  # the EMA
    # FSDP checkpoints are sharded (utils.sharded_checkpoint) and hold the same values as DDP's single file.
    a = safe_torch_load(ddp_reference / "checkpoints" / "step_0000020.pt")
    b = read_sharded(cut / "checkpoints" / "step_0000020", tmp_path / "b.pt")
    assert b["config"]["train"]["fsdp"] is True
    # (betas come back from a weights_only load as a list)
    groups = [[{**g, "betas": tuple(g["betas"])} for g in c["optimizers"]["optimizer"]["param_groups"]] for c in (a, b)]
    assert groups[0] == groups[1]
    torch.testing.assert_close(a["optimizers"]["optimizer"]["state"], b["optimizers"]["optimizer"]["state"])
    torch.testing.assert_close(a["modules"], b["modules"])


@pytest.mark.slow
def test_stop_after_step_then_resume_matches_an_uninterrupted_run(assets: dict[str, Path], tmp_path: Path) -> None:
    common = ["--max-steps", "8", "--ckpt-every", "100", "--global-batch-size", "4"]
    main(*parse_args(train_args(assets["codes"], tmp_path / "whole", *common)))
    # The interrupted run also writes sample grids: they must not disturb the training RNG streams.
    sampling = ["--tokenizer-ckpt", str(assets["tokenizer"]), "--sample-every", "3"]
    out = main(*parse_args(train_args(assets["codes"], tmp_path / "cut", *common, *sampling, "--stop-after-step", "4")))
    assert out["step"] == 4 and not (tmp_path / "cut" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.pt")) == ["step_0000004.pt"]
    main(*parse_args(train_args(assets["codes"], tmp_path / "cut", *common, *sampling, "--resume", "auto")))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    grids = sorted((tmp_path / "cut" / "samples").glob("*.png"))
    assert [p.name for p in grids] == ["step_0000003.png", "step_0000006.png"]
    assert np.asarray(Image.open(grids[0])).shape == (2 + 34, 2 + 4 * 34, 3)  # one row of 4 labels, 32 px


def test_sampling_needs_a_tokenizer(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --tokenizer-ckpt"):
        main(*parse_args(train_args(assets["codes"], tmp_path, "--sample-every", "2")))
    with pytest.raises(ValueError, match="only decodes sample grids"):
        main(*parse_args(train_args(assets["codes"], tmp_path, "--tokenizer-ckpt", str(assets["tokenizer"]))))


@pytest.mark.slow
def test_launch_scripts_run_the_entry_points(assets: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1",
           "DATA_PATH": str(assets["images"]), "TOKENIZER_CKPT": str(assets["tokenizer"]),
           "CODE_PATH": str(tmp_path / "codes"), "IMAGE_SIZE": str(IMAGE_SIZE), "BATCH_SIZE": "8",
           "CONFIG": "configs/ar/tiny.yaml", "RESULTS_DIR": str(tmp_path / "run"),
           "PYTHON": sys.executable}  # the interpreter running the tests, whatever PATH holds
    env.pop("PYTHONPATH", None)  # the launchers must not need it
    for script, extra in (("extract_codes.sh", ["--num-workers", "0"]), ("train_c2i.sh", ["--max-steps", "2"])):
        env["MASTER_PORT"] = str(free_port())
        result = subprocess.run(["bash", str(REPO / "scripts" / script), "--device", "cpu", *extra], env=env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    assert read_manifest(tmp_path / "codes")["num_augs"] == 10  # the paper recipe's ten crops
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(assets: dict[str, Path], tmp_path: Path) -> None:
    # Without dropout the two runs see the same samples per step and must take the same steps.
    # 29 rows: 7 steps of 4 = 14 micro-batches of 2 per epoch, so epochs end at the same step.
    data = load_yaml(TINY)
    data["model"].update(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    config = tmp_path / "no_dropout.yaml"
    config.write_text(yaml.safe_dump(data))
    runs = {}
    for accum in (1, 2):
        results = tmp_path / f"accum{accum}"
        main(*parse_args(["--config", str(config), "--code-path", str(assets["codes"]), "--results-dir", str(results),
                          "--device", "cpu", "--max-steps", "9", "--global-batch-size", "4",
                          "--grad-accum-steps", str(accum)]))
        runs[accum] = losses(results)
    assert [s for s, _ in runs[2]] == list(range(1, 10))
    assert [x for _, x in runs[2]] == pytest.approx([x for _, x in runs[1]], rel=1e-5)
    assert runs[2][-1][1] < runs[2][0][1]
