"""requirements.txt and pyproject.toml install the same thing, and the docs name commands that exist."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = {"pytest"}


def _pins(lines: list[str]) -> dict[str, SpecifierSet]:
    pins: dict[str, SpecifierSet] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name not in pins, f"{name} is listed twice"
            pins[name] = requirement.specifier
    return pins


def _requirements() -> dict[str, SpecifierSet]:
    return _pins((REPO / "requirements.txt").read_text().splitlines())


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_the_runtime_pins_of_requirements() -> None:
    requirements, project = _requirements(), _project()
    runtime = {name: spec for name, spec in requirements.items() if name not in TEST_ONLY}
    assert _pins(project["dependencies"]) == runtime
    # README's second command needs pytest from requirements.txt; `pip install .[test]` gets it too.
    assert _pins(project["optional-dependencies"]["test"]) == {"pytest": requirements["pytest"]}
    assert SpecifierSet(project["requires-python"]).contains("3.11")


def test_huggingface_hub_pin_ships_the_hf_command() -> None:
    # `hf download` (named by the docs and by every offline error) first shipped in huggingface_hub 0.34.0.
    spec = _requirements()["huggingface-hub"]
    assert not spec.contains(Version("0.33.9")) and spec.contains(Version("0.34.0"))


def test_no_file_outside_tests_names_huggingface_cli() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        if name.startswith("tests/"):
            continue
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files, and files deleted in the work tree but still indexed
        if "huggingface-cli" in text:
            offenders.append(name)
    assert offenders == [], f"name `hf download` instead of the retired huggingface-cli in {offenders}"
