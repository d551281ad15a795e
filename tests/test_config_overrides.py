"""``--set KEY=VALUE``: any leaf of a recipe, type-checked against its dataclasses."""

from __future__ import annotations

import pytest

from autoregressive.train import load_ar_config
from tokenizer.train import load_train_config
from utils.config import ConfigError, apply_assignments, config_to_yaml, load_yaml, parse_assignment


def test_parse_assignment_reads_yaml_values_and_bare_exponents():
    assert parse_assignment("train.optim.lr=1e-4") == (["train", "optim", "lr"], 1e-4)
    assert parse_assignment("train.sample.labels=[1, 2]") == (["train", "sample", "labels"], [1, 2])
    assert parse_assignment("train.fsdp=true") == (["train", "fsdp"], True)
    assert parse_assignment("train.max_steps=null") == (["train", "max_steps"], None)
    assert parse_assignment("train.precision=bf16") == (["train", "precision"], "bf16")


def test_set_changes_any_leaf_of_both_trainers_recipes():
    ar = apply_assignments(load_ar_config("configs/ar/tiny.yaml"),
                           ["train.optim.lr=1e-4", "model.n_layer=3", "train.sample.labels=[1,2]"])
    assert (ar.train.optim.lr, ar.model.n_layer, ar.train.sample.labels) == (1e-4, 3, (1, 2))
    tok = apply_assignments(load_train_config("configs/tokenizer/train_tiny.yaml"),
                            ["train.loss.pixel_weight=2", "model.diff_decoder.depth=1", "train.optim.lr=3e-3"])
    assert tok.train.loss.pixel_weight == 2.0 and tok.model.diff_decoder.depth == 1 and tok.train.optim.lr == 3e-3


def test_every_yaml_key_of_both_trainers_is_settable():
    for cfg in (load_ar_config("configs/ar/tiny.yaml"), load_train_config("configs/tokenizer/train_tiny.yaml")):
        flat: list[tuple[str, object]] = []

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat.append((prefix + key, value))

        import yaml

        walk(yaml.safe_load(config_to_yaml(cfg)), "")
        assert len(flat) > 20
        for key, value in flat:
            again = apply_assignments(cfg, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
            assert again == cfg, key


@pytest.mark.parametrize("assignment, message", [
    ("train.optim.lrr=1", "unknown key train.optim.lrr"),
    ("train.optim.lr=abc", "train.optim.lr: expected a number"),
    ("model.n_layer=2.5", "model.n_layer: expected an integer"),
    ("train.optim=3", "train.optim is a section"),
    ("lr", "write KEY=VALUE"),
    ("train.precision.x=1", "train.precision is a value"),
])
def test_set_mistakes_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        apply_assignments(load_ar_config("configs/ar/tiny.yaml"), [assignment])


def test_config_to_yaml_round_trips(tmp_path):
    cfg = load_ar_config("configs/ar/tiny.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_yaml(path)["train"]["optim"]["lr"] == cfg.train.optim.lr


def test_print_config_shows_the_resolved_recipe_after_flags_and_set(tmp_path):
    import yaml

    from tests.cli_testing import run_module_cli

    result = run_module_cli("tokenizer.train", "--config", "configs/tokenizer/train_tiny.yaml", "--print-config",
                            "--lr", "5e-3", "--set", "train.optim.lr=1e-3", "--mixed-precision", "none",
                            "--gradient-accumulation-steps", "2", "--no-compile")
    assert result.code == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["optim"]["lr"] == 1e-3  # --set has the last word
    assert (shown["train"]["precision"], shown["train"]["grad_accum_steps"], shown["train"]["compile"]) == ("fp32", 2, False)
    result = run_module_cli("autoregressive.train", "--config", "configs/ar/tiny.yaml", "--print-config",
                            "--gpt-model", "GPT-B", "--vq-ckpt", "tok", "--global-seed", "7")
    shown = yaml.safe_load(result.stdout)
    assert (shown["model"]["n_layer"], shown["train"]["data"]["tokenizer_ckpt"], shown["train"]["seed"]) == (12, "tok", 7)
    assert not (tmp_path / "run").exists()


def test_set_mistakes_and_a_missing_results_dir_are_one_line(tmp_path):
    from tests.cli_testing import assert_user_error, run_module_cli

    for module, recipe in (("autoregressive.train", "configs/ar/tiny.yaml"),
                           ("tokenizer.train", "configs/tokenizer/train_tiny.yaml")):
        assert_user_error(run_module_cli(module, "--config", recipe, "--results-dir", tmp_path / "run",
                                         "--set", "train.optim.lrr=2"), "unknown key train.optim.lrr")
        assert_user_error(run_module_cli(module, "--config", recipe), "pass --results-dir")
    assert not (tmp_path / "run").exists()
