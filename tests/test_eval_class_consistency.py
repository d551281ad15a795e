"""evaluations.class_consistency: the judge, the scores, extra labelled sets (--also) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluations.class_consistency import class_consistency, main

SIZE = 16
CLASSES = ("a_vertical", "b_horizontal")


def striped(label: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (SIZE, SIZE, 3): a bright bar (vertical for class 0, horizontal for class 1) at a random place."""
    image = rng.integers(0, 40, (SIZE, SIZE)).astype(np.uint8)
    at = rng.integers(2, SIZE - 4)
    if label == 0:
        image[:, at : at + 3] = 230
    else:
        image[at : at + 3, :] = 230
    return np.repeat(image[..., None], 3, axis=-1)


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(striped(label, rng)).save(root / name / f"{i:04d}.png")
    return root


def labelled_set(labels: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.stack([striped(c, rng) for c in labels]), np.array(labels)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("judge")
    return write_folder(root / "train", 1024, 0), write_folder(root / "test", 20, 1)


def test_scores_follow_the_requested_classes(folders: tuple[Path, Path]) -> None:
    train, test = folders
    wanted = [0] * 10 + [1] * 10
    images, labels = labelled_set(wanted, 2)
    swapped = (images, 1 - labels)
    # A quarter of these "reconstructions" show another class than the one they are labelled with.
    mixed = labelled_set([0] * 10 + [1] * 10, 3)[0], np.array([0] * 5 + [1] * 5 + [1] * 10)
    result = class_consistency(train, test, images, labels, SIZE, epochs=3, also={"swapped": swapped, "mixed": mixed})
    assert result["classifier_heldout_accuracy"] == 1.0
    assert result["classifier_heldout_accuracy_per_class"] == {"a_vertical": 1.0, "b_horizontal": 1.0}
    assert result["class_consistency"] == 1.0 and result["num_samples"] == 20
    assert result["also"]["swapped"]["class_consistency"] == 0.0
    assert result["also"]["mixed"]["class_consistency"] == 0.75
    assert result["also"]["mixed"]["class_consistency_per_class"] == pytest.approx({"a_vertical": 1.0, "b_horizontal": 2 / 3})


def test_cli_writes_json_with_the_also_sets_and_refuses_bad_input(folders: tuple[Path, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    train, test = folders
    images, labels = labelled_set([0, 1, 1, 0], 4)
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=labels)
    np.savez(tmp_path / "recon.npz", arr_0=images[:2], labels=labels[:2])
    np.savez(tmp_path / "unlabelled.npz", arr_0=images)
    np.savez(tmp_path / "big.npz", arr_0=images, labels=np.array([0, 1, 2, 0]))
    common = ["--train-data", str(train), "--test-data", str(test), "--image-size", str(SIZE), "--epochs", "2"]
    main([*common, "--samples", str(tmp_path / "samples.npz"), "--also", f"recon={tmp_path / 'recon.npz'}",
          "--json", str(tmp_path / "out.json")])
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["class_consistency"] == 1.0 and written["also"]["recon"]["num_samples"] == 2
    assert "Class consistency of recon: 1.0000 (2 images)" in capsys.readouterr().out
    with pytest.raises(KeyError, match="labels"):
        main([*common, "--samples", str(tmp_path / "unlabelled.npz")])
    with pytest.raises(ValueError, match="recon: labels must be class indices"):
        main([*common, "--samples", str(tmp_path / "samples.npz"), "--also", f"recon={tmp_path / 'big.npz'}"])
    with pytest.raises(SystemExit):
        main([*common, "--samples", str(tmp_path / "samples.npz"), "--also", str(tmp_path / "recon.npz")])
