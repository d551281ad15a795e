"""The README's first command, shortened: every stage of the demo runs through its real entry point."""

from __future__ import annotations

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
        assert strip.width >= 4 * 32  # one column per code group
    with Image.open(out / "samples.png") as grid:
        assert grid.height >= 10 * 32  # one row per class

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    numbers = [
        report["tokenizer"]["psnr"], report["tokenizer"]["ssim"], report["tokenizer"]["rfid"],
        report["generation"]["fid"], report["generation"]["precision"], report["generation"]["recall"],
        report["class_consistency"], report["classifier_heldout_accuracy"],
    ]
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), numbers
    assert 0.0 <= report["class_consistency"] <= 1.0
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

    # Re-running with the same folder resumes: every stage is skipped, nothing is recomputed.
    again = main(["--out", str(out), "--quick", "--device", "cpu"])
    assert again["stage_seconds"] == {}
