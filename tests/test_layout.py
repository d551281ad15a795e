"""Layout control CLI: the reference's first k groups are forced verbatim; the grid has the right shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive import GPT, sample_images
from autoregressive.layout import load_reference
from autoregressive.layout import main as layout_main
from autoregressive.stream import image_seed
from tests.extraction_testing import make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer

PER_GROUP = 4  # tiny tokenizer: 16 codes in 4 groups


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("layout")
    rng = np.random.default_rng(0)
    # Not square and not the tokenizer's size, so the ADM centre crop has work to do.
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(root / "ref.png")
    return random_gpt().save_pretrained(root / "gpt"), make_tokenizer(root / "tok"), root / "ref.png"


def run(setup: tuple[Path, Path, Path], out: Path, groups: int, *extra: str):
    gpt_dir, tok_dir, ref = setup
    return layout_main(["--gpt-ckpt", str(gpt_dir), "--tokenizer-ckpt", str(tok_dir), "--reference", str(ref),
                        "--labels", "3,7", "--samples-per-label", "3", "--prefix-groups", str(groups),
                        "--cfg-scale", "1.5,3.0", "--seed", "2", "--device", "cpu", "--out", str(out), *extra])


def test_forced_prefix_is_the_reference_codes(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    result = run(setup, tmp_path / "layout.png", 2)
    tokenizer = DARTokenizer.from_pretrained(setup[1])
    reference_codes = tokenizer.encode(load_reference(setup[2], 32))
    assert torch.equal(result.reference_codes, reference_codes)
    assert torch.equal(result.prefix, reference_codes[0, : 2 * PER_GROUP])
    assert result.codes.shape == (6, 16)
    assert torch.equal(result.codes[:, : 2 * PER_GROUP], result.prefix.expand(6, -1))
    assert not torch.equal(result.codes[0, 2 * PER_GROUP :], result.codes[1, 2 * PER_GROUP :])
    # 2 label rows of reference | reconstruction | 3 samples, 32-px tiles with 2-px padding.
    assert Image.open(tmp_path / "layout.png").size == (2 + 5 * 34, 2 + 2 * 34)


def test_zero_prefix_groups_is_plain_sampling(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    result = run(setup, tmp_path / "layout.png", 0)
    gpt = GPT.from_pretrained(setup[0])
    codes, _ = sample_images(gpt, DARTokenizer.from_pretrained(setup[1]), torch.tensor([3, 3, 3, 7, 7, 7]),
                             cfg_scale=(1.5, 3.0), seeds=[image_seed(2, i) for i in range(6)])
    assert torch.equal(result.codes, codes)


def test_too_many_prefix_groups_is_an_error(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefix_groups must be in 0..4"):
        run(setup, tmp_path / "layout.png", 5)
