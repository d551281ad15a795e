"""Both trainers: a user's mistake is one line and exit 2, checked before the run folder exists; resume,
metrics and file modes survive kills and umasks."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import utils.training
from autoregressive.train import main as ar_main
from autoregressive.train import parse_args as ar_args
from dataset.codes import write_manifest, write_shard
from tests.cli_testing import assert_user_error, run_module_cli
from tests.extraction_testing import REPO, make_image_folder, make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer.train import main as tok_main
from tokenizer.train import parse_args as tok_args
from utils.config import ConfigError
from utils.run import read_metrics
from utils.training import check_finite_weights

TOK_TINY = REPO / "configs" / "tokenizer" / "train_tiny.yaml"
AR_TINY = REPO / "configs" / "ar" / "tiny.yaml"


def tok_recipe(tmp_path: Path) -> Path:
    """train_tiny.yaml without LPIPS / REPA (fast), batch 2, a checkpoint every step."""
    recipe = yaml.safe_load(TOK_TINY.read_text())
    recipe["model"] = "tiny"
    recipe["train"].update(global_batch_size=2, max_steps=3, ckpt_every=1, sample_every=100, log_every=1)
    recipe["train"]["loss"].update(perceptual_weight=0.0, repa_weight=0.0)
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def make_codes(root: Path, count: int = 8) -> Path:
    """A code folder for configs/ar/tiny.yaml: 16 codes of vocabulary 64, labels below 10."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root, 0, rng.integers(0, 64, (count, 1, 16)), rng.integers(0, 10, count), np.arange(count), 64)
    write_manifest(root, seq_len=16, vocab_size=64, num_augs=1)
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", per_class=(2, 2), bad=None)


@pytest.fixture
def codes(tmp_path: Path) -> Path:
    return make_codes(tmp_path / "codes")


def tok_argv(tmp_path: Path, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--config", str(tok_recipe(tmp_path)), "--data-path", str(data), "--results-dir", str(out),
            "--device", "cpu", *extra]


def ar_argv(code_path: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--config", str(AR_TINY), "--code-path", str(code_path), "--results-dir", str(out), "--device", "cpu",
            "--global-batch-size", "4", "--max-steps", "3", "--ckpt-every", "1", *extra]


def steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


# ------------------------------------------------------------------------------------------------ 1. device


def test_device_cuda_without_a_gpu_is_said_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "run"
    missing = tmp_path / "missing"  # the data path is wrong too: the device is named first
    argv = tok_argv(tmp_path, missing, out)
    argv[argv.index("--device") + 1] = "cuda"
    assert_user_error(run_module_cli("tokenizer.train", *argv), "CUDA requested but no GPU is visible")
    argv = ar_argv(missing, out)
    argv[argv.index("--device") + 1] = "cuda"
    assert_user_error(run_module_cli("autoregressive.train", *argv), "CUDA requested but no GPU is visible")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 2. configs


def test_a_model_config_where_a_recipe_belongs_is_named_in_one_line(tmp_path: Path, images: Path,
                                                                    codes: Path) -> None:
    out = tmp_path / "run"
    model_yaml = REPO / "configs" / "tokenizer" / "tiny.yaml"
    line = assert_user_error(run_module_cli("tokenizer.train", "--config", str(model_yaml), "--data-path",
                                            str(images), "--results-dir", str(out)),
                             f"{model_yaml} is a model config; pass a training recipe such as "
                             "configs/tokenizer/train_tiny.yaml")
    assert "encoder_dim" not in line  # not the list of 25 keys
    gpt_model_only = tmp_path / "gpt_model.yaml"  # what GPT.save_pretrained writes as config.yaml
    gpt_model_only.write_text(yaml.safe_dump({"model": yaml.safe_load(AR_TINY.read_text())["model"]}))
    assert_user_error(run_module_cli("autoregressive.train", "--config", str(gpt_model_only), "--code-path",
                                     str(codes), "--results-dir", str(out)),
                      f"{gpt_model_only} is a model config; pass a training recipe such as configs/ar/tiny.yaml")
    # The other trainer's files.
    assert_user_error(run_module_cli("tokenizer.train", "--config", str(AR_TINY), "--data-path", str(images),
                                     "--results-dir", str(out)), "is a GPT config", "configs/tokenizer/train_tiny.yaml")
    for shipped in ("gpt_l.yaml", "demo.yaml"):  # recipes that name their GPT preset
        assert_user_error(run_module_cli("tokenizer.train", "--config", str(AR_TINY.with_name(shipped)), "--data-path",
                                         str(images), "--results-dir", str(out)), "is a GPT config")
    assert_user_error(run_module_cli("autoregressive.train", "--config", str(TOK_TINY), "--code-path", str(codes),
                                     "--results-dir", str(out)), "is a tokenizer training recipe", "configs/ar/tiny.yaml")
    assert_user_error(run_module_cli("autoregressive.train", "--config", str(model_yaml), "--code-path", str(codes),
                                     "--results-dir", str(out)), "is a tokenizer config", "configs/ar/tiny.yaml")
    assert not out.exists()


def test_unknown_recipe_keys_bad_presets_and_broken_yaml_are_one_line(tmp_path: Path, images: Path,
                                                                       codes: Path) -> None:
    out = tmp_path / "run"
    recipe = yaml.safe_load(TOK_TINY.read_text())
    recipe["model"] = "tiny"
    recipe["train"]["loss"]["lpips_weight"] = 0.5
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(recipe))
    assert_user_error(run_module_cli("tokenizer.train", "--config", str(typo), "--data-path", str(images),
                                     "--results-dir", str(out)), "train.loss.lpips_weight", "did you mean")
    ar = yaml.safe_load(AR_TINY.read_text())
    ar["model"] = {"preset": "gpt_huge"}
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump(ar))
    assert_user_error(run_module_cli("autoregressive.train", "--config", str(preset), "--code-path", str(codes),
                                     "--results-dir", str(out)), "unknown GPT preset 'gpt_huge'", "GPT-L")
    tok = yaml.safe_load(TOK_TINY.read_text())
    tok["model"] = "huge"
    bad_model = tmp_path / "bad_model.yaml"
    bad_model.write_text(yaml.safe_dump(tok))
    assert_user_error(run_module_cli("tokenizer.train", "--config", str(bad_model), "--data-path", str(images),
                                     "--results-dir", str(out)), "neither a tokenizer preset")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    assert_user_error(run_module_cli("tokenizer.train", "--config", str(broken), "--data-path", str(images),
                                     "--results-dir", str(out)), f"{broken} is not valid YAML")
    missing = tmp_path / "nope.yaml"
    assert_user_error(run_module_cli("autoregressive.train", "--config", str(missing), "--code-path", str(codes),
                                     "--results-dir", str(out)), f"{missing} does not exist")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 3-5. resume


def _temporaries(run: Path) -> list[Path]:
    stale = [run / "checkpoints" / ".step_0000009.pt.k1ll3d00.tmp", run / "checkpoints" / ".latest.k1ll3d00.tmp"]
    for path in stale:
        path.write_bytes(b"torn")
    return stale


def _resume_without_pointer(train: callable, argv: list[str], run: Path) -> None:
    """Step 1, kill before the pointer write (no `latest`, stale temporaries), resume with auto, then with the
    pointer file itself; metrics read as one run of 3 steps."""
    train(argv + ["--stop-after-step", "1"])
    (run / "checkpoints" / "latest").unlink()
    stale = _temporaries(run)
    with (run / "metrics.jsonl").open("a") as f:  # a line logged after the checkpoint, before the kill
        f.write(json.dumps({"step": 2, "loss": 123.0}) + "\n")
    train(argv + ["--resume", "auto", "--stop-after-step", "2"])
    assert not any(p.exists() for p in stale)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002.pt"
    train(argv + ["--resume", str(run / "checkpoints" / "latest")])
    assert steps(run) == [1, 2, 3]
    assert 123.0 not in [r.get("loss") for r in read_metrics(run / "metrics.jsonl")]
    assert (run / "final").is_dir()


def test_tokenizer_resume_auto_without_the_pointer_sweeps_and_truncates(tmp_path: Path, images: Path) -> None:
    run = tmp_path / "run"
    _resume_without_pointer(lambda argv: tok_main(*tok_args(argv)), tok_argv(tmp_path, images, run), run)


def test_gpt_resume_auto_without_the_pointer_sweeps_and_truncates(tmp_path: Path, codes: Path) -> None:
    run = tmp_path / "run"
    _resume_without_pointer(lambda argv: ar_main(*ar_args(argv)), ar_argv(codes, run), run)


@pytest.mark.parametrize("trainer", ["tokenizer", "gpt"])
def test_a_kill_before_the_first_checkpoint_leaves_no_repeated_steps(tmp_path: Path, images: Path, codes: Path,
                                                                     trainer: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # What a launch killed during step 3, before its first checkpoint, leaves behind.
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2))
                                       + '{"step": 3, "lo')
    if trainer == "tokenizer":
        tok_main(*tok_args(tok_argv(tmp_path, images, run, "--resume", "auto", "--max-steps", "2")))
    else:
        ar_main(*ar_args(ar_argv(codes, run, "--resume", "auto", "--max-steps", "2")))
    assert steps(run) == [1, 2]
    assert 99.0 not in [r.get("loss") for r in read_metrics(run / "metrics.jsonl")]


def test_resume_mistakes_are_one_line(tmp_path: Path, codes: Path) -> None:
    run = tmp_path / "run"
    ar_main(*ar_args(ar_argv(codes, run, "--max-steps", "1")))
    # A fresh start into a run with checkpoints (the pointer gone) points at --resume auto.
    (run / "checkpoints" / "latest").unlink()
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(codes, run, "--max-steps", "1")),
                      "already holds checkpoints", "--resume auto")
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(codes, tmp_path / "new", "--resume",
                                                                      str(tmp_path / "nope.pt"))),
                      f"{tmp_path / 'nope.pt'} does not exist")
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(codes, tmp_path / "new", "--resume",
                                                                      str(run / "final" / "model.safetensors"))),
                      "is not a training checkpoint")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ 6. settings

BAD_SETTINGS = [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-0.001"), ("--global-batch-size", "0"),
                ("--max-steps", "0"), ("--ckpt-every", "0"), ("--log-every", "-1"), ("--keep-last", "0"),
                ("--max-bad-steps", "0"), ("--grad-accum-steps", "0"), ("--ema-decay", "1.5"),
                ("--stop-after-step", "0"), ("--num-workers", "-1")]


@pytest.mark.parametrize("flag, value", BAD_SETTINGS)
def test_out_of_range_settings_name_the_flag(tmp_path: Path, images: Path, codes: Path, flag: str,
                                             value: str) -> None:
    out = tmp_path / "run"
    for module, argv in (("tokenizer.train", tok_argv(tmp_path, images, out, flag, value)),
                         ("autoregressive.train", ar_argv(codes, out, flag, value))):
        line = assert_user_error(run_module_cli(module, *argv), flag, "must be")
        assert value in line, line
        assert not out.exists()


def test_non_finite_weights_are_never_exported(tmp_path: Path, images: Path, codes: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_gpt()
    check_finite_weights(model, "a finite model")
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"--lr .*--max-bad-steps"):
        check_finite_weights(model, "a diverged model")

    def diverge(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
        with torch.no_grad():
            for p in ema.parameters():
                p.fill_(float("nan"))

    import utils.trainer

    monkeypatch.setattr(utils.trainer, "update_ema", diverge)  # both trainers update the EMA there
    with pytest.raises(FloatingPointError, match="refusing to export"):
        tok_main(*tok_args(tok_argv(tmp_path, images, tmp_path / "tok", "--max-steps", "1")))
    assert not (tmp_path / "tok" / "final").exists()
    with pytest.raises(FloatingPointError, match="refusing to export"):
        ar_main(*ar_args(ar_argv(codes, tmp_path / "gpt", "--max-steps", "1")))
    assert not (tmp_path / "gpt" / "final").exists()  # the diverged EMA is the GPT's final/ too


# ------------------------------------------------------------------------------------------------ 7. inputs


def test_missing_inputs_are_named_before_the_run_folder_exists(tmp_path: Path, images: Path, codes: Path) -> None:
    out = tmp_path / "run"
    missing = tmp_path / "missing"
    assert_user_error(run_module_cli("tokenizer.train", *tok_argv(tmp_path, missing, out)), f"{missing} does not exist")
    assert_user_error(run_module_cli("tokenizer.train", *tok_argv(tmp_path, images, out, "--init-from", str(missing))),
                      f"{missing} does not exist")
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(missing, out)), f"{missing} does not exist")
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(images, out)),
                      f"{images / 'manifest.json'} does not exist", "tokenizer.extract_codes")
    on_the_fly = ["--config", str(AR_TINY), "--results-dir", str(out), "--device", "cpu"]
    assert_user_error(run_module_cli("autoregressive.train", *on_the_fly, "--data-path", str(missing),
                                     "--tokenizer-ckpt", str(images)), f"{missing} does not exist")
    assert_user_error(run_module_cli("autoregressive.train", *on_the_fly, "--data-path", str(images),
                                     "--tokenizer-ckpt", str(missing)), f"{missing} does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_module_cli("tokenizer.train", *tok_argv(tmp_path, empty, out)), "no images")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    assert_user_error(run_module_cli("tokenizer.train", *tok_argv(tmp_path, images, not_a_folder)),
                      "--results-dir", "is a file")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 8. bad images


@pytest.fixture
def bounded_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail instead of hanging if a trainer keeps drawing batches without stopping."""
    original, calls = utils.training.InfiniteLoader.__next__, [0]

    def bounded(self: utils.training.InfiniteLoader) -> object:
        calls[0] += 1
        assert calls[0] < 100, "the trainer kept drawing batches of undecodable files"
        return original(self)

    monkeypatch.setattr(utils.training.InfiniteLoader, "__next__", bounded)


def test_an_all_undecodable_folder_stops_both_trainers(tmp_path: Path, bounded_loader: None) -> None:
    garbage = tmp_path / "garbage" / "c0"
    garbage.mkdir(parents=True)
    for i in range(4):
        (garbage / f"img_{i}.png").write_bytes(b"\x89PNG not really" + bytes([i]))
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "run"
    result = run_module_cli("autoregressive.train", "--config", str(AR_TINY), "--data-path", str(garbage.parent),
                            "--tokenizer-ckpt", str(tokenizer), "--results-dir", str(out), "--device", "cpu",
                            "--global-batch-size", "2", "--max-steps", "3")
    assert_user_error(result, "every one of the 4 files", str(garbage.parent), "4 skipped")
    result = run_module_cli("tokenizer.train", *tok_argv(tmp_path, garbage.parent, tmp_path / "tok"))
    assert_user_error(result, "every one of the 4 files", "4 skipped")


# ------------------------------------------------------------------------------------------------ 9. empty codes


def test_an_empty_code_set_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "codes"
    empty.mkdir()
    write_shard(empty, 0, np.zeros((0, 1, 16), np.int64), np.zeros(0), np.zeros(0), 64)
    write_manifest(empty, seq_len=16, vocab_size=64, num_augs=1)
    out = tmp_path / "run"
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(empty, out)), f"{empty} has 0 items")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 11. modes


def test_run_files_are_readable_by_group_and_others_under_umask_022(tmp_path: Path, images: Path,
                                                                    codes: Path) -> None:
    previous = os.umask(0o022)
    try:
        tok_main(*tok_args(tok_argv(tmp_path, images, tmp_path / "tok", "--max-steps", "1")))
        ar_main(*ar_args(ar_argv(codes, tmp_path / "gpt", "--max-steps", "1")))
    finally:
        os.umask(previous)
    files = [tmp_path / "tok" / "config.yaml", tmp_path / "tok" / "checkpoints" / "step_0000001.pt",
             tmp_path / "tok" / "checkpoints" / "latest", tmp_path / "gpt" / "config.yaml",
             tmp_path / "gpt" / "checkpoints" / "step_0000001.pt"]
    files += sorted((tmp_path / "tok" / "final").iterdir()) + sorted((tmp_path / "gpt" / "final").iterdir())
    assert len(files) > 7
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} has mode {oct(mode)}"


# ------------------------------------------------------------------------------------------------ 12. wrong kinds


def test_weights_of_the_wrong_kind_are_one_line(tmp_path: Path, images: Path, codes: Path) -> None:
    gpt_folder = random_gpt().save_pretrained(tmp_path / "gpt_final")
    out = tmp_path / "run"
    result = run_module_cli("tokenizer.train", *tok_argv(tmp_path, images, out, "--init-from", str(gpt_folder)))
    assert_user_error(result, str(gpt_folder))
    result = run_module_cli("autoregressive.train", "--config", str(AR_TINY), "--data-path", str(images),
                            "--tokenizer-ckpt", str(gpt_folder), "--results-dir", str(out), "--device", "cpu")
    assert_user_error(result, str(gpt_folder))
    assert not out.exists()


def test_settings_errors_stay_config_errors_for_callers(tmp_path: Path, images: Path) -> None:
    cfg, opts = tok_args(tok_argv(tmp_path, images, tmp_path / "run", "--lr", "nan"))
    with pytest.raises(ConfigError, match="--lr"):
        tok_main(cfg, opts)


def test_gpt_init_from_mistakes_are_one_line(tmp_path: Path, codes: Path) -> None:
    out = tmp_path / "run"
    missing = tmp_path / "missing"
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(codes, out, "--init-from", str(missing))),
                      "--init-from", f"{missing} does not exist")
    tokenizer = make_tokenizer(tmp_path / "tokenizer")  # the wrong kind of weights
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(codes, out, "--init-from", str(tokenizer))),
                      "--init-from", str(tokenizer))
    wider = random_gpt(dim=128).save_pretrained(tmp_path / "wider")  # a GPT of another size
    assert_user_error(run_module_cli("autoregressive.train", *ar_argv(codes, out, "--init-from", str(wider))),
                      "--init-from", "shape mismatches")
    assert not out.exists()
