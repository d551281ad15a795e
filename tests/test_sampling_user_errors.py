"""Sampling CLIs and model loading: every user mistake is one ``error:`` line and exit 2, named with its flag.

The CLIs run as ``python -m`` would run them (``tests.cli_testing.run_module_cli``, in-process), so what
is checked is the command-line edge itself. Training checkpoints are written with
``save_train_checkpoint`` and the top-level entries the trainers add for ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive import GPT, sample_images, stream
from autoregressive.layout import layout_samples
from autoregressive.model import GPTLoadError, LabelRangeError
from autoregressive.sample_ddp import MANIFEST, SAMPLES, SHARD_DIR
from tests.cli_testing import assert_user_error, run_module_cli
from tests.extraction_testing import make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer
from tokenizer.config import TOKENIZER_PRESETS
from utils.checkpoint import CheckpointManager
from utils.checkpoint_kind import WrongModelError
from utils.config import dataclass_to_dict
from utils.distributed import DistEnv
from utils.errors import UserError
from utils.training import save_train_checkpoint

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def gpt_run(root: Path, gpt: GPT, ema: GPT | None, step: int = 3) -> Path:
    """A run folder as autoregressive.train leaves it: modules + top-level model/ema + gpt_config."""
    modules = {"model": gpt} if ema is None else {"model": gpt, "ema": ema}
    aliases = {name: module.state_dict() for name, module in modules.items()}
    aliases["gpt_config"] = dataclass_to_dict(gpt.config)
    save_train_checkpoint(CheckpointManager(root / "checkpoints"), CPU, step,
                          {"model": dataclass_to_dict(gpt.config)}, modules, {}, aliases=aliases)
    return root


def tokenizer_run(root: Path, tokenizer: DARTokenizer) -> Path:
    """A run folder as tokenizer.train leaves it (with EMA): top-level ema + tokenizer_config."""
    config = dataclass_to_dict(tokenizer.config)
    save_train_checkpoint(CheckpointManager(root / "checkpoints"), CPU, 3, {"model": config},
                          {"model": tokenizer, "ema": tokenizer}, {},
                          aliases={"ema": tokenizer.state_dict(), "tokenizer_config": config})
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    gpt, ema = random_gpt(seed=0), random_gpt(seed=1)
    tokenizer_dir = make_tokenizer(root / "tok")
    reference = root / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(reference)
    return {
        "gpt": gpt.save_pretrained(root / "gpt"),
        "tok": tokenizer_dir,
        "gpt_run": gpt_run(root / "gpt_run", gpt, None),  # the paper recipes: EMA off
        "gpt_ema_run": gpt_run(root / "gpt_ema_run", gpt, ema),
        "tok_run": tokenizer_run(root / "tok_run", DARTokenizer.from_pretrained(tokenizer_dir)),
        "ref": reference,
    }


def sample_args(models: dict[str, Path], out: Path, *extra: str, gpt: str = "gpt", tok: str = "tok") -> list[str]:
    return ["--gpt-ckpt", str(models[gpt]) if gpt in models else gpt,
            "--tokenizer-ckpt", str(models[tok]) if tok in models else tok,
            "--labels", "1", "--samples-per-label", "1", "--device", "cpu", "--out", str(out), *extra]


def ddp_args(models: dict[str, Path], out: Path, *extra: str, gpt: str = "gpt") -> list[str]:
    return ["--gpt-ckpt", str(models[gpt]) if gpt in models else gpt, "--tokenizer-ckpt", str(models["tok"]),
            "--num-samples", "4", "--per-proc-batch-size", "2", "--device", "cpu", "--out", str(out), *extra]


def layout_args(models: dict[str, Path], out: Path, *extra: str, reference: str | None = None) -> list[str]:
    return ["--gpt-ckpt", str(models["gpt"]), "--tokenizer-ckpt", str(models["tok"]),
            "--reference", reference or str(models["ref"]), "--labels", "1", "--samples-per-label", "1",
            "--prefix-groups", "1", "--device", "cpu", "--out", str(out), *extra]


def same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# 1. --device cuda without a GPU: said first, before any checkpoint or other input is looked at
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["autoregressive.sample", "autoregressive.sample_ddp", "autoregressive.layout"])
def test_cuda_without_gpu_is_the_first_thing_said(module: str, models: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    missing = str(tmp_path / "missing")
    argv = ["--gpt-ckpt", missing, "--tokenizer-ckpt", missing, "--device", "cuda", "--out", str(tmp_path / "out")]
    extra = {"autoregressive.sample": ["--labels", "99"],
             "autoregressive.sample_ddp": ["--num-classes", "99"],
             "autoregressive.layout": ["--labels", "99", "--reference", missing, "--prefix-groups", "1"]}[module]
    assert_user_error(run_module_cli(module, *argv, *extra), "CUDA requested but no GPU is visible", "--device cpu")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# 2. RUN/checkpoints/latest as a checkpoint
# ------------------------------------------------------------------------------------------------
def test_latest_pointer_loads_training_checkpoints(models: dict[str, Path]) -> None:
    step = models["gpt_ema_run"] / "checkpoints" / "step_0000003.pt"
    state = torch.load(step, weights_only=True)
    for source in (models["gpt_ema_run"] / "checkpoints" / "latest", models["gpt_ema_run"] / "checkpoints"):
        assert same_weights(GPT.from_pretrained(source), state["model"])
        assert same_weights(GPT.from_pretrained(source, ema=True), state["ema"])
    tok_state = torch.load(models["tok_run"] / "checkpoints" / "step_0000003.pt", weights_only=True)["ema"]
    tokenizer = DARTokenizer.from_pretrained(models["tok_run"] / "checkpoints" / "latest")
    assert tokenizer.config == TOKENIZER_PRESETS["tiny"] and same_weights(tokenizer, tok_state)


def test_latest_pointer_works_in_the_sampling_clis(models: dict[str, Path], tmp_path: Path) -> None:
    gpt_latest = str(models["gpt_ema_run"] / "checkpoints" / "latest")
    tok_latest = str(models["tok_run"] / "checkpoints" / "latest")
    result = run_module_cli("autoregressive.sample",
                            *sample_args(models, tmp_path / "grid.png", "--ema", gpt=gpt_latest, tok=tok_latest))
    assert result.code == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()

    # sample_ddp pins the pointer to the checkpoint it names: more training makes a rerun a mismatch.
    out = tmp_path / "fid"
    result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out, "--max-shards", "0", gpt=gpt_latest))
    assert result.code == 0, result.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["gpt_ckpt"].endswith("step_0000003.pt")
    run = tmp_path / "more"
    gpt_run(run, random_gpt(), None, step=3)
    gpt_run(run, random_gpt(), None, step=5)
    later = str(run / "checkpoints" / "latest")
    run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out / "x", "--max-shards", "0", gpt=later))
    assert json.loads((out / "x" / MANIFEST).read_text())["gpt_ckpt"].endswith("step_0000005.pt")


# ------------------------------------------------------------------------------------------------
# 3. A checkpoint of the other model: named, in the library and at the CLI (with the flag)
# ------------------------------------------------------------------------------------------------
def test_tokenizer_given_as_gpt_and_gpt_as_tokenizer_library(models: dict[str, Path]) -> None:
    for source in (models["tok"], models["tok"] / "model.safetensors", models["tok_run"] / "checkpoints" / "latest"):
        with pytest.raises(WrongModelError, match=r"is a D-AR tokenizer checkpoint, not a GPT checkpoint"):
            GPT.from_pretrained(source)
        with pytest.raises(WrongModelError, match="D-AR tokenizer"):
            GPT.from_pretrained(source, preset="tiny")  # not a wall of missing keys either
    for source in (models["gpt"], models["gpt"] / "model.safetensors", models["gpt_run"] / "checkpoints" / "latest"):
        with pytest.raises(WrongModelError, match=r"is a GPT checkpoint, not a D-AR tokenizer checkpoint"):
            DARTokenizer.from_pretrained(source)


def test_tokenizer_given_as_gpt_and_gpt_as_tokenizer_cli(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "grid.png"
    result = run_module_cli("autoregressive.sample", *sample_args(models, out, gpt="tok"))
    assert_user_error(result, f"{models['tok']} is a D-AR tokenizer checkpoint; --gpt-ckpt needs a GPT checkpoint")
    result = run_module_cli("autoregressive.sample", *sample_args(models, out, tok="gpt"))
    assert_user_error(result, f"{models['gpt']} is a GPT checkpoint; --tokenizer-ckpt needs a D-AR tokenizer")
    pointer = str(models["tok_run"] / "checkpoints" / "latest")
    result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, tmp_path / "fid", gpt=pointer))
    assert_user_error(result, f"{pointer} is a D-AR tokenizer checkpoint; --gpt-ckpt")
    assert not out.parent.exists() and not (tmp_path / "fid").exists()


def test_preset_messages_name_the_flag_at_the_cli(models: dict[str, Path], tmp_path: Path) -> None:
    official = tmp_path / "official.pt"
    torch.save({"model": random_gpt().state_dict()}, official)
    with pytest.raises(GPTLoadError, match=r"pass preset= \(one of"):
        GPT.from_pretrained(official)
    result = run_module_cli("autoregressive.sample", *sample_args(models, tmp_path / "g.png", gpt=str(official)))
    line = assert_user_error(result, f"{official} does not store a GPT config: pass --gpt-preset (one of")
    assert "preset=" not in line
    result = run_module_cli("autoregressive.sample", *sample_args(models, tmp_path / "g.png", "--gpt-preset", "GPT-B"))
    assert_user_error(result, "differs from preset 'GPT-B'; drop --gpt-preset")


# ------------------------------------------------------------------------------------------------
# 4. ema=True on a run trained with EMA off
# ------------------------------------------------------------------------------------------------
def test_ema_on_a_checkpoint_without_ema_falls_back_with_a_warning(models: dict[str, Path], tmp_path: Path) -> None:
    step = models["gpt_run"] / "checkpoints" / "step_0000003.pt"
    with pytest.warns(UserWarning, match="has no EMA weights"):
        model = GPT.from_pretrained(step, ema=True)
    assert same_weights(model, torch.load(step, weights_only=True)["model"])
    latest = str(models["gpt_run"] / "checkpoints" / "latest")
    with pytest.warns(UserWarning, match="has no EMA weights"):
        result = run_module_cli("autoregressive.sample", *sample_args(models, tmp_path / "g.png", "--ema", gpt=latest))
    assert result.code == 0, result.stderr
    # A save_pretrained export holds one set of weights: --ema there is a mistake, named with the flag.
    result = run_module_cli("autoregressive.sample", *sample_args(models, tmp_path / "g.png", "--ema"))
    assert_user_error(result, "holds one set of weights", "--ema")


# ------------------------------------------------------------------------------------------------
# 5. Sampling labels are in [0, num_classes); the forward pass still takes the null class
# ------------------------------------------------------------------------------------------------
def test_sampling_refuses_the_null_class_and_negative_labels(models: dict[str, Path]) -> None:
    gpt, tokenizer = GPT.from_pretrained(models["gpt"]), DARTokenizer.from_pretrained(models["tok"])
    reference = torch.zeros(1, 3, 32, 32)
    for bad in (10, -1):
        labels = torch.tensor([1, bad])
        calls = (lambda: gpt.generate(labels), lambda: stream(gpt, tokenizer, labels),
                 lambda: sample_images(gpt, tokenizer, labels),
                 lambda: layout_samples(gpt, tokenizer, reference, labels, 1, seed=0))
        for call in calls:
            with pytest.raises(LabelRangeError, match=r"labels must be in \[0, 10\)"):
                call()
    with pytest.raises(UserError, match="null class"):
        gpt.generate(torch.tensor([10]))
    # Guidance feeds the null class through the forward pass, which keeps accepting it.
    with torch.no_grad():
        logits = gpt(torch.zeros(1, 16, dtype=torch.long), torch.tensor([gpt.config.null_class]))
    assert logits.shape == (1, 16, 64)


@pytest.mark.parametrize("module", ["autoregressive.sample", "autoregressive.layout"])
@pytest.mark.parametrize("label", ["10", "-1", "3,12"])
def test_cli_labels_outside_the_classes(module: str, label: str, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "grid.png"
    argv = sample_args(models, out) if module.endswith("sample") else layout_args(models, out)
    argv[argv.index("--labels") + 1] = label
    assert_user_error(run_module_cli(module, *argv), "--labels must be in [0, 10)", label.split(",")[-1])
    assert not out.parent.exists()


# ------------------------------------------------------------------------------------------------
# 6. sample_ddp --num-classes outside 1..N
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [("0", "--num-classes: must be >= 1, got 0"),
                                             ("-3", "--num-classes: must be >= 1, got -3"),
                                             ("11", "--num-classes must be in 1..10 (the GPT's classes), got 11")])
def test_ddp_num_classes_outside_range(value: str, fragment: str, models: dict[str, Path], tmp_path: Path) -> None:
    result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, tmp_path / "fid", "--num-classes", value))
    assert_user_error(result, fragment)
    assert not (tmp_path / "fid").exists()


# ------------------------------------------------------------------------------------------------
# 7. Malformed or out-of-range flags: one line naming the flag (argparse level, nothing is loaded)
# ------------------------------------------------------------------------------------------------
BAD_FLAGS = [
    ("autoregressive.sample", "--gpt-preset", "GPT-Q", "invalid choice: 'GPT-Q'"),
    ("autoregressive.sample", "--batch-size", "0", "must be >= 1, got 0"),
    ("autoregressive.sample", "--batch-size", "-2", "must be >= 1, got -2"),
    ("autoregressive.sample", "--samples-per-label", "0", "must be >= 1"),
    ("autoregressive.sample", "--cfg-scale", "abc", "'abc'"),
    ("autoregressive.sample", "--cfg-scale", "1.2,", "'1.2,'"),
    ("autoregressive.sample", "--cfg-scale", "1,2,3", "'1,2,3'"),
    ("autoregressive.sample", "--cfg-scale", "nan", "finite"),
    ("autoregressive.sample", "--temperature", "-0.5", "must be >= 0"),
    ("autoregressive.sample", "--temperature", "hot", "expected a number, got 'hot'"),
    ("autoregressive.sample", "--top-k", "-1", "must be >= 0"),
    ("autoregressive.sample", "--top-p", "0", "must be in (0, 1]"),
    ("autoregressive.sample", "--top-p", "1.5", "must be in (0, 1]"),
    ("autoregressive.sample", "--seed", "-1", "must be >= 0"),
    ("autoregressive.sample_ddp", "--per-proc-batch-size", "0", "must be >= 1"),
    ("autoregressive.sample_ddp", "--num-samples", "0", "must be >= 1"),
    ("autoregressive.sample_ddp", "--num-samples", "-5", "must be >= 1"),
    ("autoregressive.sample_ddp", "--max-shards", "-1", "must be >= 0"),
    ("autoregressive.sample_ddp", "--top-p", "-0.1", "must be in (0, 1]"),
    ("autoregressive.layout", "--samples-per-label", "0", "must be >= 1"),
    ("autoregressive.layout", "--prefix-groups", "-1", "must be >= 0"),
    ("autoregressive.layout", "--cfg-scale", "1,2,3", "'1,2,3'"),
]


@pytest.mark.parametrize("module, flag, value, fragment", BAD_FLAGS)
def test_bad_flag_values(module: str, flag: str, value: str, fragment: str, models: dict[str, Path],
                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = {"autoregressive.sample": sample_args, "autoregressive.sample_ddp": ddp_args,
            "autoregressive.layout": layout_args}[module](models, out)
    assert_user_error(run_module_cli(module, *argv, f"{flag}={value}"), f"argument {flag}", fragment)
    assert not out.exists()


def test_too_many_prefix_groups_at_the_cli(models: dict[str, Path], tmp_path: Path) -> None:
    result = run_module_cli("autoregressive.layout", *layout_args(models, tmp_path / "l.png", "--prefix-groups", "5"))
    assert_user_error(result, "--prefix-groups 5", "0..4")
    assert not (tmp_path / "l.png").exists()


# ------------------------------------------------------------------------------------------------
# 8. sample_ddp sweeps what killed writes left, samples.npz's temporary included
# ------------------------------------------------------------------------------------------------
def test_ddp_sweeps_stale_temporaries_at_start(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fid"
    (out / SHARD_DIR).mkdir(parents=True)
    stale = [out / f".{SAMPLES}.k1l2l3ed.tmp", out / f".{MANIFEST}.x9.tmp", out / SHARD_DIR / ".shard_000001.npz.ab.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    kept = out / "notes.txt"
    kept.write_text("mine")
    result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out, "--max-shards", "0"))
    assert result.code == 0, result.stderr
    assert not any(path.exists() for path in stale) and kept.is_file()


# ------------------------------------------------------------------------------------------------
# 9. Other mistakes: missing paths, wrong outputs, unreadable reference, mismatched models, ...
# ------------------------------------------------------------------------------------------------
def test_missing_paths_say_they_do_not_exist(models: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nothing" / "here"
    out = tmp_path / "sub" / "g.png"
    for which in ("gpt", "tok"):
        argv = sample_args(models, out, **{which: str(missing)})
        assert_user_error(run_module_cli("autoregressive.sample", *argv), f"{missing} does not exist")
    result = run_module_cli("autoregressive.layout", *layout_args(models, out, reference=str(missing)))
    assert_user_error(result, f"--reference: {missing} does not exist")
    result = run_module_cli("autoregressive.sample", *sample_args(models, out, "--tokenizer-config", str(missing)))
    assert_user_error(result, str(missing), "neither a tokenizer preset")
    assert not out.parent.exists()


def test_unusable_outputs_and_inputs(models: dict[str, Path], tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ("autoregressive.sample", sample_args(models, tmp_path), "--out", "is a folder"),
        ("autoregressive.sample", sample_args(models, a_file / "g.png"), "--out", "is a file"),
        ("autoregressive.sample", sample_args(models, tmp_path / "g.png", "--gif", str(tmp_path)), "--gif", "folder"),
        ("autoregressive.sample_ddp", ddp_args(models, a_file), "--out", "is a file; pass a folder"),
        ("autoregressive.layout", layout_args(models, tmp_path / "l.png", reference=str(a_file)),
         str(a_file), "cannot be used as an image"),
        ("autoregressive.sample", sample_args(models, tmp_path / "g.png", gpt=str(models["gpt_run"])),
         "is a training run folder", "checkpoints/latest"),
        ("autoregressive.sample", sample_args(models, tmp_path / "g.png", "--gpt-file", "x.pt",
                                              gpt=str(models["gpt"] / "model.safetensors")), "drop --gpt-file", ""),
    ]
    for module, argv, *fragments in cases:
        assert_user_error(run_module_cli(module, *argv), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_gpt_and_tokenizer_that_do_not_belong_together(models: dict[str, Path], tmp_path: Path) -> None:
    other = random_gpt(vocab_size=32).save_pretrained(tmp_path / "gpt32")
    result = run_module_cli("autoregressive.sample", *sample_args(models, tmp_path / "g.png", gpt=str(other)))
    assert_user_error(result, "does not match the tokenizer", "vocab 32")


def test_unreadable_manifest_and_changed_settings(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fid"
    assert run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out, "--max-shards", "0")).code == 0
    result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out, "--max-shards", "0", "--seed", "7"))
    assert_user_error(result, "was started with other settings", "seed: 0", "use a new --out")
    (out / MANIFEST).write_text("{not json")
    result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out, "--max-shards", "0"))
    assert_user_error(result, f"{out / MANIFEST} is not valid JSON")


# ------------------------------------------------------------------------------------------------
# 10. Inputs are checked before any output exists
# ------------------------------------------------------------------------------------------------
def test_failed_runs_leave_no_output_folder(models: dict[str, Path], tmp_path: Path) -> None:
    other = random_gpt(vocab_size=32).save_pretrained(tmp_path / "gpt32")
    out = tmp_path / "new" / "fid"
    for extra, gpt in ((("--num-classes", "11"), "gpt"), ((), str(other)), ((), "tok")):
        result = run_module_cli("autoregressive.sample_ddp", *ddp_args(models, out, *extra, gpt=gpt))
        assert result.code == 2, result.stderr
        assert not (tmp_path / "new").exists()

