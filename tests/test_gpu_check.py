"""scripts.gpu_check: the --tiny run end to end, merging into an existing results file, the no-GPU exit."""

from __future__ import annotations

import pytest
import torch

from scripts import gpu_check
from scripts.gpu_check import Row, merge_results
from tests.cli_testing import assert_user_error, run_module_cli

# One thread: on a busy two-core machine the default two threads made the tiny steps ~100x slower.
TINY = ["--tiny", "--threads", "1"]


def _number(value: str) -> float:
    return float(value.replace(",", "").rstrip("x"))


def test_tiny_run_measures_every_section_and_writes_each_row(tmp_path):
    out = tmp_path / "results.md"
    rows = gpu_check.main([*TINY, "--out", str(out)])

    assert list(dict.fromkeys(r.section for r in rows)) == list(gpu_check.SECTIONS)
    for row in rows:
        assert row.metric not in ("FAILED", "skipped"), row
        assert _number(row.value) > 0, row
    written = gpu_check._parse_rows(out.read_text(encoding="utf-8").splitlines())
    assert [(r.section, r.metric, r.value) for r in written] == [(r.section, r.metric, r.value) for r in rows]
    metrics = {(r.section, r.metric) for r in rows}
    assert {("gpt_l_sample", "images/s, eager"), ("gpt_l_sample", "images/s, torch.compile"),
            ("gpt_l_decode_step", "speed-up compiled / eager")} <= metrics
    for name in gpu_check.GPT_RECIPES:
        assert "estimator:" in next(r.notes for r in rows if r.section == name)
    assert "full objective" in next(r.notes for r in rows if r.section == "tokenizer_train")


def test_runs_merge_into_an_existing_file(tmp_path):
    out = tmp_path / "results.md"
    before = "# Results\n\nWritten by hand.\n\n## Other section\n\nkeep me | too\n"
    out.write_text(before, encoding="utf-8")

    gpu_check.main([*TINY, "--out", str(out), "--only", "gpt_b_train"])
    gpu_check.main([*TINY, "--out", str(out), "--only", "tokenizer_encode"])
    gpu_check.main([*TINY, "--out", str(out), "--only", "gpt_b_train"])

    text = out.read_text(encoding="utf-8")
    assert text.startswith(before)
    assert text.count("## gpu_check") == 1
    assert [r.section for r in gpu_check._parse_rows(text.splitlines())] == ["gpt_b_train", "tokenizer_encode"]


def test_merge_replaces_rows_by_section_and_keeps_the_rest():
    old = merge_results("# Title\n\n## After\n\ntail\n", [
        Row("inception", "images/s", "1.0", "2.00", "a | b"),
        Row("gpt_b_train", "tokens/s", "5", "1.00", "old"),
    ], "s0", "env zero")
    assert old.index("## gpu_check") > old.index("tail")  # appended when absent

    text = "# Title\n\n" + old[old.index("## gpu_check"):] + "\n## After\n\ntail\n"
    new = merge_results(text, [Row("inception", "images/s", "3.0")], "s1", "env one")
    rows = gpu_check._parse_rows(new.splitlines())
    assert [(r.section, r.value, r.run) for r in rows] == [("gpt_b_train", "5", "s0"), ("inception", "3.0", "s1")]
    assert new.startswith("# Title\n\n## gpu_check\n") and new.endswith("\n## After\n\ntail\n")
    assert "- `s0`: env zero" in new and "- `s1`: env one" in new

    newer = merge_results(new, [Row("gpt_b_train", "tokens/s", "6")], "s2", "env two")
    assert "`s0`" not in newer  # no row refers to that run any more
    assert merge_results(newer, [], "s3", "x").count("| inception |") == 1
    again = merge_results(old, [], "s9", "env")
    assert next(r.notes for r in gpu_check._parse_rows(again.splitlines()) if r.section == "inception") == "a | b"


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA GPU is visible, so the check measures instead of refusing")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "results.md"
    result = run_module_cli("scripts.gpu_check", "--out", out)
    assert result.code == 0, result.stderr
    assert "No CUDA GPU is visible" in result.stdout
    assert not out.exists()


def test_unknown_section_is_a_user_error(tmp_path):
    result = run_module_cli("scripts.gpu_check", "--tiny", "--only", "gpt_b_train,nope", "--out", tmp_path / "r.md")
    assert "nope" in assert_user_error(result, "unknown section")
