"""The README's first command, shortened: every stage of the demo runs through its real entry point."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_quick_demo_writes_every_output(tmp_path: Path) -> None:
    from scripts.demo import main

    out = tmp_path / "demo"
    report = main(["--out", str(out), "--quick", "--device", "cpu"])

    for name in ("reconstructions.png", "samples.png", "previews.png", "layout.png"):
        with Image.open(out / name) as image:
            assert image.width >= 32 and image.height >= 32, name
    with Image.open(out / "stream.gif") as gif:
        # One frame per code group (4); Pillow merges identical consecutive frames, which the barely
        # trained quick-mode models can produce, so only the upper bound is exact.
        assert 1 <= gif.n_frames <= 4
    with Image.open(out / "previews.png") as strip:
        # One row per class (its first sample), one column per code group; 32-px tiles, 2-px padding.
        assert strip.size == (2 + 4 * 34, 2 + 10 * 34)
    with Image.open(out / "samples.png") as grid:
        assert grid.height >= 10 * 32  # one row per class

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["stages_run_this_invocation"] == list(report["stage_seconds"]) and len(report["stage_seconds"]) == 10
    numbers = [
        report["tokenizer"]["psnr"], report["tokenizer"]["ssim"], report["tokenizer"]["rfid"],
        report["generation"]["fid"], report["generation"]["precision"], report["generation"]["recall"],
        report["class_consistency"], report["classifier_heldout_accuracy"], report["tokenizer"]["class_consistency"],
    ]
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), numbers
    assert 0.0 <= report["class_consistency"] <= 1.0
    # The judge scores every class of the samples and of the labelled reconstructions (4 held-out images each).
    class_names = sorted(p.name for p in (out / "data" / "test").iterdir() if p.is_dir())
    for key in ("class_consistency_per_class", "classifier_heldout_accuracy_per_class"):
        assert sorted(report[key]) == class_names, key
    assert sorted(report["tokenizer"]["class_consistency_per_class"]) == class_names
    with np.load(out / "recon" / "recon.npz") as recon:
        assert recon["labels"].tolist() == [c for c in range(10) for _ in range(4)]
    assert report["quality"].startswith("The judge assigns at least half of the samples")
    # Both FIDs share one cached set of reference features; the demo's FID takes the eigh route.
    assert (out / "recon" / "ref_features.npz").is_file() and report["generation"]["fid_method"] == "eigh"
    assert report["generation"]["num_reference"] == 40  # 4 held-out images of each of the 10 classes
    # The demo recipe's codebook entropy and pixel terms are trained, logged and named in the report.
    metrics = (out / "tokenizer" / "metrics.jsonl").read_text()
    assert '"entropy"' in metrics and '"pixel"' in metrics
    assert report["tokenizer"]["loss_weights"] == {
        "flow": 1.0, "codebook": 1.0, "commitment": 1.0, "entropy": 0.1, "pixel": 16.0,
    }

    with np.load(out / "fid" / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (20, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
        assert sorted(set(samples["labels"].tolist())) == list(range(10))

    # Re-running with the same folder resumes: every stage is skipped, nothing is recomputed (on any device).
    again = main(["--out", str(out), "--quick", "--device", "auto"])
    assert again["stages_run_this_invocation"] == [] and again["stage_seconds"] == report["stage_seconds"]
    assert sorted(json.loads((out / "stages.json").read_text())) == sorted(report["stage_seconds"])
    # Resuming with other settings stops instead of mixing outputs: another seed at the first finished stage,
    # the full demo at the data stage (the quick demo wrote a 20-per-class subset).
    with pytest.raises(SystemExit, match=r"(?s)\[tokenizer\] .*then: .*--seed 0.*now: .*--seed 1"):
        main(["--out", str(out), "--quick", "--device", "cpu", "--seed", "1"])
    with pytest.raises(SystemExit, match=r"\[data\] .*other settings \(--quick or not\?\)"):
        main(["--out", str(out), "--device", "cpu"])


def test_shipped_heldout_features_match_the_demo_reference_batch(tmp_path: Path) -> None:
    """The full demo starts its FID reference cache from the shipped file: it must be the features of exactly
    the reference batch the reconstruct stage writes (key check) and real Inception features (spot check)."""
    import torch

    from dataset.fashion_mnist import HELDOUT_FEATURES_PATH, materialize_fashion_mnist
    from dataset.images import CenterCrop, ImageFolderDataset
    from evaluations.evaluator import _cache_key, read_feature_cache
    from evaluations.inception import load_fid_inception
    from scripts.demo import FULL
    from utils.images import to_uint8

    assert FULL.shipped_reference_features and FULL.recon_images == 10 * FULL.test_per_class
    test_dir = materialize_fashion_mnist(tmp_path / "test", "test", limit_per_class=FULL.test_per_class)
    dataset = ImageFolderDataset(test_dir, CenterCrop(FULL.image_size), with_labels=False)
    # What tokenizer.reconstruct stores as recon_ref.npz: the first recon_images crops in dataset order.
    images = np.stack([to_uint8(dataset[i].image[None])[0] for i in range(FULL.recon_images)])
    model = load_fid_inception(None, device="cpu")
    cached = read_feature_cache(HELDOUT_FEATURES_PATH, _cache_key(model, images), ["pool", "spatial"])
    assert cached is not None, "stale shipped features: rebuild them (dataset/fashion_mnist/README.md)"
    assert cached["pool"].shape == (300, 2048) and cached["spatial"].shape == (300, 2023)
    fresh = model(torch.from_numpy(images[[0, 157, 299]]))
    np.testing.assert_allclose(cached["pool"][[0, 157, 299]], fresh["pool"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cached["spatial"][[0, 157, 299]], fresh["spatial"].numpy(), rtol=1e-4, atol=1e-4)


def test_quality_statement_names_the_classes_the_judge_rejects() -> None:
    from scripts.demo import quality_statement

    assert quality_statement({}) is None
    text = quality_statement({"class_consistency_per_class": {"shirt": 0.37, "bag": 1.0, "sandal": 0.07, "coat": 0.5},
                              "classifier_heldout_accuracy_per_class": {"shirt": 0.3, "sandal": 0.93}})
    assert text.startswith("The judge assigns at least half of the samples to the requested class for 2 of 4 classes")
    assert "below half (judge on real images of the class in brackets): sandal 0.07 (0.93), shirt 0.37 (0.30)." in text
    assert "below half" not in quality_statement({"class_consistency_per_class": {"bag": 0.9}})


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "subprocess"])
def test_stage_runner_runs_a_module_like_python_dash_m(isolate: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """A stage's exit status is what ``python -m`` would give, in this process (its ``cli()``) or a child one."""
    import sys

    from scripts.demo import run

    logged: list[str] = []
    argv = list(sys.argv)
    run("help", ["evaluations.evaluator", "--help"], logged.append, isolate)  # argparse exits with 0
    assert logged[0] == "[help] $ python -m evaluations.evaluator --help" and logged[-1].startswith("[help] done")
    with pytest.raises(SystemExit, match=r"\[bad\] failed with exit code 2; re-run the same command to resume"):
        run("bad", ["evaluations.evaluator", "--no-such-flag"], logged.append, isolate)
    assert sys.argv == argv
    if not isolate:  # a child's output bypasses capsys
        captured = capsys.readouterr()
        assert "usage:" in captured.out and "error: the following arguments are required" in captured.err


def test_in_process_stage_maps_exit_messages_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``SystemExit("message")`` is exit code 1 with the message on stderr (as the interpreter does); a user
    mistake is exit code 2 with one line; an exception propagates with its traceback after a line saying how
    to resume; ``sys.argv`` is left alone."""
    import logging
    import sys

    from scripts.demo import REPO_ROOT, run

    cli = "from utils.errors import call_cli\ndef cli(argv=None):\n    return call_cli(main, argv)\n"
    (tmp_path / "stage_exit.py").write_text(cli + "def main(argv):\n    raise SystemExit('bad input: ' + argv[0])\n")
    (tmp_path / "stage_mistake.py").write_text(
        cli + "from utils.errors import UserError\ndef main(argv):\n    raise UserError('no such ' + argv[0])\n"
    )
    (tmp_path / "stage_raise.py").write_text("def cli(argv=None):\n    raise ValueError('broken')\n")
    (tmp_path / "stage_ok.py").write_text(
        cli + "import logging, os\ndef main(argv):\n    assert argv == ['x', 'y']\n"
        "    open(__file__ + '.cwd', 'w').write(os.getcwd())\n"
        "    logging.getLogger('stage_ok').addHandler(logging.FileHandler(__file__ + '.log'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv, main_module = list(sys.argv), sys.modules["__main__"]
    logged: list[str] = []
    run("ok", ["stage_ok", "x", "y"], logged.append)
    # Run from the repo root (the stage commands name repo-relative configs); the caller's cwd is restored.
    assert (tmp_path / "stage_ok.py.cwd").read_text() == str(REPO_ROOT) and Path.cwd() == tmp_path
    # A log file the stage opened is closed with the stage, as a process exit would close it.
    assert not logging.getLogger("stage_ok").handlers and sys.modules["__main__"] is main_module
    with pytest.raises(SystemExit, match="exit code 1"):
        run("exit", ["stage_exit", "z"], logged.append)
    assert "bad input: z" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="exit code 2"):
        run("mistake", ["stage_mistake", "file"], logged.append)
    assert capsys.readouterr().err == "error: no such file\n"
    with pytest.raises(ValueError, match="broken"):
        run("raise", ["stage_raise"], logged.append)
    assert logged[-1] == "[raise] failed (ValueError); re-run the same command to resume"
    assert sys.argv == argv and Path.cwd() == tmp_path


def test_demo_runs_no_module_through_runpy() -> None:
    """The stages are plain calls of each entry point's ``cli()``; nothing re-executes a module as __main__."""
    import importlib

    import scripts.demo

    source = Path(scripts.demo.__file__).read_text()
    assert "runpy" not in source
    # Every module a stage command names offers cli(); a stage's module is the first word after "python -m".
    stage_modules = {"tokenizer.train", "tokenizer.reconstruct", "evaluations.evaluator", "tokenizer.extract_codes",
                     "autoregressive.train", "autoregressive.sample", "autoregressive.layout",
                     "autoregressive.sample_ddp", "evaluations.class_consistency"}
    for name in stage_modules:
        assert f'"{name}"' in source, name
        assert callable(importlib.import_module(name).cli), name


def test_stage_record_ignores_the_device_and_the_folder_and_hashes_configs(tmp_path: Path) -> None:
    from scripts.demo import REPO_ROOT, stage_record, stale_stage_message

    config = "configs/tokenizer/train_demo.yaml"
    command = ["tokenizer.train", "--config", config, "--results-dir", str(tmp_path / "tokenizer"), "--seed", "0"]
    record = stage_record([*command, "--device", "cpu"], tmp_path)
    assert record == {
        "command": ["tokenizer.train", "--config", config, "--results-dir", "{out}/tokenizer", "--seed", "0"],
        "config_sha256": {config: hashlib.sha256((REPO_ROOT / config).read_bytes()).hexdigest()},
    }
    moved = tmp_path / "elsewhere"
    assert stage_record([*command[:4], str(moved / "tokenizer"), *command[5:], "--device", "cuda"], moved) == record

    edited = {**record, "config_sha256": {config: "0" * 64}}
    message = stale_stage_message("tokenizer", edited, record, tmp_path)
    assert f"{config} changed since that run" in message and "then:" not in message
    reseeded = {**record, "command": [*record["command"][:-1], "1"]}
    message = stale_stage_message("tokenizer", reseeded, record, tmp_path)
    assert "then: python -m tokenizer.train" in message and "--seed 1" in message.splitlines()[1]


def test_demo_mistakes_are_one_line_before_anything_is_written(tmp_path, monkeypatch) -> None:
    from tests.cli_testing import assert_user_error, run_module_cli

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert_user_error(run_module_cli("scripts.demo", "--out", afile), "is a file")
    assert_user_error(run_module_cli("scripts.demo", "--out", tmp_path / "d", "--device", "cuda"),
                      "CUDA requested but no GPU is visible")
    assert_user_error(run_module_cli("scripts.demo", "--out", tmp_path / "d", "--seed", "-1"), "--seed")
    assert not (tmp_path / "d").exists()
