"""The shell launchers (scripts/*.sh) run the interpreter named by PYTHON and look nothing else up on PATH.

README's second command may be run as `.venv/bin/python -m pytest -q` without activating the venv:
then PATH holds no `python` with the requirements and maybe no `torchrun` at all, so a launcher that
called either by name would run the wrong interpreter or none.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.extraction_testing import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted((REPO / "scripts").glob("*.sh"))
# What the launchers need from PATH besides the interpreter (nvidia-smi is optional).
SHELL_TOOLS = ("bash", "dirname", "basename", "wc", "mkdir")


def _bare_path(tmp_path: Path) -> str:
    """A PATH holding only the shell tools the launchers use: no python, no torchrun."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in SHELL_TOOLS:
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to run the launchers"
        (folder / tool).symlink_to(found)
    return str(folder)


def _env(path: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}
    env.pop("PYTHONPATH", None)
    return env


def test_launchers_call_no_interpreter_by_name() -> None:
    assert len(LAUNCHERS) >= 7
    for launcher in LAUNCHERS:
        for number, line in enumerate(launcher.read_text().splitlines(), 1):
            code = re.sub(r'\becho\s+"[^"]*"', "", line.split("#", 1)[0])  # messages may say "python"
            for word in re.findall(r"(?<![\w$\-])(python3?|torchrun)(?![\w\-])", code):
                pytest.fail(f"{launcher.name}:{number} runs `{word}` from PATH; use \"$PYTHON\": {line.strip()}")


def test_launch_with_only_the_named_interpreter(tmp_path: Path) -> None:
    path = _bare_path(tmp_path)
    assert shutil.which("python", path=path) is None and shutil.which("torchrun", path=path) is None
    env = _env(path, PYTHON=sys.executable, DATA_PATH=str(tmp_path / "images"), NPROC_PER_NODE="1",
               MASTER_PORT=str(free_port()))
    # --help goes through torch.distributed.run to tokenizer.train: the cheapest run of the whole chain.
    result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "train_tokenizer.sh"), "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "usage:" in result.stdout and "--results-dir" in result.stdout


def test_launch_with_a_relative_interpreter_path(tmp_path: Path) -> None:
    # A venv's `.venv/bin/python` given relative to where the launcher starts, which is not the repo root.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    env = _env(_bare_path(tmp_path), PYTHON="venv/bin/python")
    result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "sample_c2i.sh"), "L", "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "usage: python -m autoregressive.sample" in result.stdout


def test_launch_without_an_interpreter_says_how_to_name_one(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    env = _env(_bare_path(tmp_path), PYTHON=str(missing), DATA_PATH=str(tmp_path))
    for launcher in ("train_tokenizer.sh", "sample_c2i.sh"):
        result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / launcher)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (launcher, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert str(missing) in lines[0] and "PYTHON=" in lines[0]


def _fid_launcher_commands(tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
    """The argument lists ``scripts/sample_c2i_fid.sh`` hands its interpreter, recorded by a stand-in."""
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "calls.txt"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{shutil.which('bash')}\nprintf '%s\\n' '---' \"$@\" >> {log}\n")
    fake.chmod(0o755)
    result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "sample_c2i_fid.sh"), *args], cwd=tmp_path,
                            env=_env(_bare_path(tmp_path), PYTHON=str(fake), REF_BATCH="ref.npz", NPROC_PER_NODE="1",
                                     **env),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls, current = [], None
    for line in log.read_text().splitlines():
        if line == "---":
            current = []
            calls.append(current)
        else:
            current.append(line)
    return calls


def _sample_ddp_argv(call: list[str]) -> list[str]:
    assert call[:2] == ["-m", "torch.distributed.run"] and "autoregressive.sample_ddp" in call, call
    return call[call.index("autoregressive.sample_ddp") + 1:]


SAMPLING_FLAGS = ("--cfg-scale", "--temperature", "--top-k", "--top-p")


@pytest.mark.parametrize("protocol", [["--protocol", "official"], ["--protocol=official"]])
def test_fid_launcher_leaves_the_official_protocol_its_own_sampling_settings(tmp_path: Path, protocol) -> None:
    from autoregressive.sample_ddp import OFFICIAL_FLAGS, apply_protocol, parse_args

    sample, evaluate = _fid_launcher_commands(tmp_path / "default", "L", *protocol)
    argv = _sample_ddp_argv(sample)
    assert not set(SAMPLING_FLAGS) & set(argv), argv
    args = parse_args(argv)
    apply_protocol(args)  # the old launcher's --cfg-scale 1.1,8.0 made this refuse the run
    assert args.cfg_scale == OFFICIAL_FLAGS["cfg_scale"][0] and args.out == "samples/D-AR-L-official-seed0"
    assert evaluate[:3] == ["-m", "evaluations.evaluator", "ref.npz"]

    # A CFG the user sets is passed on, for sample_ddp to judge against the protocol.
    argv = _sample_ddp_argv(_fid_launcher_commands(tmp_path / "cfg", "L", *protocol, CFG="1.2,8.0")[0])
    assert argv[argv.index("--cfg-scale") + 1] == "1.2,8.0" and "--temperature" not in argv


def test_fid_launcher_passes_the_paper_settings_under_the_balanced_protocol(tmp_path: Path) -> None:
    from autoregressive.sample_ddp import parse_args

    argv = _sample_ddp_argv(_fid_launcher_commands(tmp_path, "XL")[0])
    for flag, value in zip(SAMPLING_FLAGS, ("1.1,10.0", "1.0", "0", "1.0")):
        assert argv[argv.index(flag) + 1] == value, (flag, argv)
    args = parse_args(argv)
    assert args.protocol == "balanced" and args.out == "samples/D-AR-XL-cfg1.1,10.0-seed0"
