"""The paper's GPT recipes name their architecture by preset: the sizes are written once, in GPT_PRESETS."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoregressive import GPT_PRESETS
from utils.config import load_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ar"


@pytest.mark.parametrize("stem,preset", [("gpt_b", "GPT-B"), ("gpt_l", "GPT-L"), ("gpt_xl", "GPT-XL"),
                                         ("gpt_xxl", "GPT-XXL")])
def test_paper_recipes_refer_to_their_preset(stem: str, preset: str) -> None:
    model = load_yaml(CONFIGS / f"{stem}.yaml")["model"]
    assert model.get("preset") == preset and preset in GPT_PRESETS
    # Anything else under model: is an override, and must differ from the preset (else it repeats it).
    base = GPT_PRESETS[preset]
    repeated = sorted(k for k, v in model.items() if k != "preset" and getattr(base, k) == v)
    assert not repeated, f"{stem}.yaml repeats preset fields: {repeated}"
