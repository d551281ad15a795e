"""The command-line edge: user mistakes become one line and exit status 2 (no traceback)."""

from __future__ import annotations

import pytest
import torch

from utils.distributed import resolve_device
from utils.errors import UserError, call_cli, run_cli


def test_run_cli_turns_user_errors_into_exit_2_and_keeps_bugs(capsys):
    def mistake():
        raise UserError("x does not exist\nsecond line")

    with pytest.raises(SystemExit) as exit_:
        run_cli(mistake)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: x does not exist; second line"

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_cli(bug)


def test_call_cli_returns_the_status_python_would_exit_with(capsys):
    def mistake(name):
        raise UserError(f"{name} does not exist\nsecond line")

    assert call_cli(mistake, "x") == 2
    assert capsys.readouterr().err == "error: x does not exist; second line\n"
    assert call_cli(lambda: None) == 0 and call_cli(lambda: 7) == 0  # main's return value is not a status
    for code, status in ((None, 0), (0, 0), (3, 3)):
        def leave(code=code):
            raise SystemExit(code)

        assert call_cli(leave) == status
    assert capsys.readouterr().err == ""

    def message():
        raise SystemExit("stopped: reason")

    assert call_cli(message) == 1 and capsys.readouterr().err == "stopped: reason\n"

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        call_cli(bug)


ENTRY_POINTS = ("tokenizer.train", "tokenizer.reconstruct", "tokenizer.extract_codes", "autoregressive.train",
                "autoregressive.sample", "autoregressive.layout", "autoregressive.sample_ddp",
                "evaluations.evaluator", "evaluations.class_consistency", "evaluations.make_reference",
                "scripts.demo", "scripts.estimate_memory", "scripts.gpu_check", "scripts.benchmark_sampling",
                "scripts.benchmark_tokenizer", "scripts.benchmark_training", "scripts.benchmark_streaming")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_cli_function_is_what_python_dash_m_runs(module, capsys):
    """``module.cli(argv)`` gives the status and the one line ``python -m module argv`` gives, and the module's
    ``__main__`` block is that call."""
    import importlib
    from pathlib import Path

    from tests.cli_testing import run_module_cli

    imported = importlib.import_module(module)
    assert Path(imported.__file__).read_text().endswith('if __name__ == "__main__":\n    raise SystemExit(cli())\n')
    assert imported.cli(["--no-such-flag"]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1
    assert run_module_cli(module, "--no-such-flag").error_line() == line[0]
    assert imported.cli(["--help"]) == 0
    assert f"usage: python -m {module}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is visible")
def test_device_cuda_without_gpu_is_a_user_error_and_auto_picks_cpu():
    with pytest.raises(UserError, match="CUDA requested but no GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto").type == "cpu"


def test_a_missing_local_path_with_one_slash_is_not_taken_for_a_hub_repo(tmp_path, monkeypatch):
    from utils.hub import WeightsNotFoundError, resolve_file

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError, match=r"^runs/final does not exist"):
        resolve_file("runs/final", default_filename="model.safetensors")


def test_yaml_mistakes_name_the_file(tmp_path):
    from utils.config import ConfigError, load_yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML \(line"):
        load_yaml(bad)
    with pytest.raises(UserError, match=r"missing\.yaml does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)


def test_a_missing_path_that_could_be_a_repo_id_says_it_does_not_exist(tmp_path, monkeypatch):
    from utils.hub import WeightsNotFoundError, resolve_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError, match=r"^nowhere/final does not exist locally"):
        resolve_file("nowhere/final")
