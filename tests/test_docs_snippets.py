"""Every python and shell block of README.md and GETTING_STARTED.md runs, or says why it cannot.

A block that cannot run on a CPU machine without network (installs, the full demo, the test suite
itself, hub downloads, GPU-scale or ImageNet commands) carries ``<!-- skip-test: reason -->`` on the
line directly above its opening fence. Every other block is run: python blocks in-process, each in a
fresh namespace with a temporary working directory, and shell blocks through bash in that directory,
with ``python`` meaning the interpreter running the tests. ``from_pretrained`` is patched to load
tiny random models (the hub is not reachable here), and ``demo_out/`` holds tiny models in the demo's
layout, so the documented calls run for real on small shapes. An unmarked block that would install
packages or start the test suite or the full demo is refused without being run.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive import GPT
from tests.extraction_testing import make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "GETTING_STARTED.md")
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
SKIP = re.compile(r"^\s*<!--\s*skip-test:(.*?)-->\s*$")
# Blocks that run today: README's API example; GETTING_STARTED's install check, tokenizer, GPT,
# Inception and official-weights examples, the demo-model commands and the two tar-shard packing
# examples. Fewer means a block was lost or skip-marked without need.
MIN_BLOCKS_RUN = 9
# Never run unmarked: a block that installs packages or starts the test suite or the full demo.
NEVER_RUN = re.compile(r"\b(pip|conda|apt-get|pytest)\b|scripts\.demo\b")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    language: str  # "python" or "shell"
    code: str
    skip: str | None  # the skip marker's reason

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def extract_blocks(text: str, doc: str) -> list[Block]:
    """The python and shell blocks of a markdown text, dedented to their fence, with their skip reasons."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            skip = SKIP.match(lines[i])
            if skip is not None and (i + 1 >= len(lines) or FENCE.match(lines[i + 1]) is None):
                raise AssertionError(f"{doc}:{i + 1}: a skip-test marker must sit directly above a code fence")
            i += 1
            continue
        indent, language = match.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{doc}:{i + 1}: code fence never closed")
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        skip = SKIP.match(lines[i - 1]) if i else None
        if language.lower() in LANGUAGES:
            reason = skip.group(1).strip() if skip else None
            if skip is not None and not reason:
                raise AssertionError(f"{doc}:{i}: a skip-test marker needs a reason")
            blocks.append(Block(doc, i + 1, LANGUAGES[language.lower()], "\n".join(body) + "\n", reason))
        i = end + 1
    return blocks


def doc_blocks() -> list[Block]:
    return [block for doc in DOCS for block in extract_blocks((REPO / doc).read_text(encoding="utf-8"), doc)]


# ------------------------------------------------------------------------------------------------
# tiny stand-ins for the hub weights


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tokenizer folder, and tiny GPT folders for 10 classes (the demo) and 1000 (ImageNet)."""
    root = tmp_path_factory.mktemp("tiny_models")
    folders = {"tokenizer": make_tokenizer(root / "tokenizer")}
    for classes in (10, 1000):
        folders[f"gpt{classes}"] = random_gpt(num_classes=classes).save_pretrained(root / f"gpt{classes}")
    return folders


@pytest.fixture
def hub_is_tiny(monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path]) -> None:
    """Route ``from_pretrained`` to the tiny models, after checking the documented call's arguments."""
    real_tokenizer, real_gpt = DARTokenizer.from_pretrained, GPT.from_pretrained

    def tokenizer(*args: Any, **kwargs: Any) -> DARTokenizer:
        bound = inspect.signature(real_tokenizer).bind(*args, **kwargs)
        return real_tokenizer(tiny_models["tokenizer"], device=bound.arguments.get("device"))

    def gpt(*args: Any, **kwargs: Any) -> GPT:
        bound = inspect.signature(real_gpt).bind(*args, **kwargs)
        return real_gpt(tiny_models["gpt1000"], map_location=bound.arguments.get("map_location", "cpu"))

    monkeypatch.setattr(DARTokenizer, "from_pretrained", staticmethod(tokenizer))
    monkeypatch.setattr(GPT, "from_pretrained", staticmethod(gpt))


def make_demo_out(workdir: Path, tiny_models: dict[str, Path]) -> None:
    """``demo_out/`` as the demo leaves it, as far as the documented commands read it."""
    demo = workdir / "demo_out"
    (demo / "gpt").mkdir(parents=True)
    (demo / "tokenizer").mkdir()
    (demo / "gpt" / "final").symlink_to(tiny_models["gpt10"], target_is_directory=True)
    (demo / "tokenizer" / "final").symlink_to(tiny_models["tokenizer"], target_is_directory=True)
    dress = demo / "data" / "test" / "03_dress"
    dress.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(dress / "00300.png")


# ------------------------------------------------------------------------------------------------
# running a block


def run_python(block: Block) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - the docs are this repo's own code


def run_shell(block: Block, workdir: Path) -> None:
    if NEVER_RUN.search(block.code):
        raise AssertionError("installs packages or runs the test suite / the full demo: mark it skip-test")
    bindir = workdir / ".bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "python").exists():
        (bindir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def run_block(block: Block, workdir: Path) -> None:
    if block.language == "python":
        run_python(block)
    else:
        run_shell(block, workdir)


# ------------------------------------------------------------------------------------------------
# tests


def test_docs_blocks_run_or_say_why_not(hub_is_tiny: None, tiny_models: dict[str, Path],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = doc_blocks()
    ran, skipped, failed = [], [], []
    for index, block in enumerate(blocks):
        if block.skip is not None:
            skipped.append(block)
            continue
        workdir = tmp_path / f"block{index:02d}"
        workdir.mkdir()
        make_demo_out(workdir, tiny_models)
        # Documented commands run from the repository root, where configs/ is.
        (workdir / "configs").symlink_to(REPO / "configs", target_is_directory=True)
        monkeypatch.chdir(workdir)
        start = time.perf_counter()
        try:
            run_block(block, workdir)
        except Exception as error:  # report every failing block at once, each with its place in the docs
            failed.append(f"{block.where} ({block.language}): {type(error).__name__}: {error}")
        else:
            ran.append((block, time.perf_counter() - start))
            if block.doc == "README.md" and block.language == "python":
                assert sorted(workdir.glob("preview_*.png")), "README's example saves its previews to files"
    print(f"\ndocs blocks: {len(ran)} ran, {len(skipped)} skip-marked, {len(failed)} failed")
    for block, seconds in ran:
        print(f"  ran      {block.where} ({block.language}, {seconds:.1f} s)")
    for block in skipped:
        print(f"  skipped  {block.where} ({block.language}): {block.skip}")
    assert not failed, ("these blocks neither run nor carry <!-- skip-test: reason --> directly above them:\n"
                        + "\n".join(failed))
    assert len(ran) >= MIN_BLOCKS_RUN, f"only {len(ran)} doc blocks ran"
    readme_python = [b for b, _ in ran if b.doc == "README.md" and b.language == "python"]
    assert readme_python, "README's API example must run as written"


def test_skipped_blocks_are_still_valid_code() -> None:
    for block in doc_blocks():
        if block.skip is None:
            continue
        if block.language == "python":
            compile(block.code, block.where, "exec")
        else:
            check = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, f"{block.where}: {check.stderr}"


def test_an_unmarked_block_that_fails_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ("Intro\n\n<!-- skip-test: needs a GPU -->\n```python\nraise RuntimeError('gpu')\n```\n\n"
            "- item\n\n   ```bash\n   exit 3\n   ```\n\n```python\nx = undefined_name\n```\n\n```bibtex\n@misc{x}\n```\n")
    blocks = extract_blocks(text, "doc.md")
    assert [(b.line, b.language, b.skip) for b in blocks] == [(4, "python", "needs a GPU"), (10, "shell", None),
                                                              (14, "python", None)]
    assert blocks[1].code == "exit 3\n"
    monkeypatch.chdir(tmp_path)
    for block in blocks[1:]:
        with pytest.raises((AssertionError, NameError)):
            run_block(block, tmp_path)
    install = extract_blocks("```bash\npip install -r requirements.txt\n```\n", "doc.md")[0]
    with pytest.raises(AssertionError, match="mark it skip-test"):
        run_block(install, tmp_path)  # refused before anything runs


def test_markers_must_sit_on_a_fence_and_give_a_reason() -> None:
    with pytest.raises(AssertionError, match="directly above"):
        extract_blocks("<!-- skip-test: a reason -->\n\n```bash\ntrue\n```\n", "doc.md")
    with pytest.raises(AssertionError, match="needs a reason"):
        extract_blocks("<!-- skip-test: -->\n```bash\ntrue\n```\n", "doc.md")


def test_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 80
    commands = "pip install -r requirements.txt && python -m scripts.demo --out demo_out\npython -m pytest -q\n"
    assert extract_blocks(readme, "README.md")[0].code == commands  # the two commands come first
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" in link:
            continue
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        width, height = Image.open(REPO / picture).size
        assert width >= 500 and height >= 500, f"{picture} is {width}x{height}: too small to see"
    for needle in ("D-AR-tokenizer_v1.pt", "D-AR-L-360K.pt", "D-AR-XL-360K.pt", "1.52", "2.44", "262.9", "2.09",
                   "298.4", "2505.23660", "@article", "docs/demo.md", "GETTING_STARTED.md", "License"):
        assert needle in readme, needle
    assert "0.60" in readme  # the demo's figures as a range that includes the fresh-clone run, not its best run


def test_docs_cite_no_documents_outside_the_repository() -> None:
    """No doc, comment, docstring or --help text cites a document the repository does not hold."""
    # Written split so that this file, which the check covers too, does not mention them itself.
    outside = ("SP" "EC", "CHECKPOINT" "_FORMAT", "GOLDEN" ".md", "../" "shared")
    names = [*DOCS, "requirements.txt", "pyproject.toml"]
    for folder in ("autoregressive", "configs", "dataset", "docs", "evaluations", "scripts", "tests", "tokenizer",
                   "utils"):
        names += sorted(str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*")
                        if p.suffix in (".py", ".md", ".sh", ".yaml", ".yml", ".txt", ".toml") and p.is_file())
    assert "docs/demo.md" in names and "tests/test_docs_snippets.py" in names
    for name in names:
        text = (REPO / name).read_text(encoding="utf-8")
        for cited in outside:
            assert cited not in text, f"{name} cites {cited}"
