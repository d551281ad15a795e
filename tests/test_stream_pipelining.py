"""D-AR pipelining of streams: the pixel decoder runs group k while the GPT writes group k + 1.

The pipelined path must yield exactly the sequential path's records (codes, previews, step counts),
on the CPU (decoder thread) and on CUDA (side stream, when a GPU is present). No timings here: the
speed is measured by scripts/benchmark_streaming.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from autoregressive import GPT, StreamStep, stream
from autoregressive.sample import main as sample_main
from autoregressive.stream import PIPELINE_BY_DEFAULT, default_pipeline
from scripts import benchmark_streaming
from tests.extraction_testing import make_tokenizer
from tests.gpt_testing import random_gpt
from tests.test_stream import CFG, gpt, tokenizer  # noqa: F401 (the same module-scoped models as test_stream)
from tokenizer import DARTokenizer


def assert_same_records(a: list[StreamStep], b: list[StreamStep]) -> None:
    assert [(s.groups, s.steps, s.num_groups) for s in a] == [(s.groups, s.steps, s.num_groups) for s in b]
    for x, y in zip(a, b):
        assert torch.equal(x.codes, y.codes)
        assert torch.equal(x.preview, y.preview)  # bit for bit, not just close


@pytest.mark.parametrize("sampler", ["adams2", "euler"])
def test_pipelined_records_equal_sequential(gpt: GPT, tokenizer: DARTokenizer, sampler: str) -> None:
    labels, seeds = torch.tensor([1, 2, 3]), [11, 12, 13]
    sequential = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, sampler=sampler, pipeline=False))
    pipelined = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, sampler=sampler, pipeline=True))
    assert len(pipelined) == tokenizer.config.num_query_groups
    assert_same_records(sequential, pipelined)


def test_pipelined_generator_and_prefix_equal_sequential(gpt: GPT, tokenizer: DARTokenizer) -> None:
    prefix = torch.tensor([3, 1, 4, 1, 5, 9])  # ends inside the second group
    runs = [list(stream(gpt, tokenizer, torch.tensor([4, 7]), cfg_scale=2.0, top_k=20, prefix_codes=prefix,
                        generator=torch.Generator().manual_seed(5), pipeline=p)) for p in (False, True)]
    assert_same_records(*runs)


def test_caller_modes_reach_the_decoder_thread(gpt: GPT, tokenizer: DARTokenizer) -> None:
    labels, seeds = torch.tensor([0, 5]), [1, 2]
    sequential = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, pipeline=False))
    with torch.inference_mode():
        pipelined = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, pipeline=True))
    assert_same_records(sequential, pipelined)
    assert all(s.preview.is_inference() for s in pipelined)
    pipelined = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, pipeline=True))
    assert not any(s.preview.requires_grad for s in pipelined)


def test_thread_counts_are_left_as_they_were(gpt: GPT, tokenizer: DARTokenizer) -> None:
    before = torch.get_num_threads()
    list(stream(gpt, tokenizer, torch.tensor([1]), seeds=[3], pipeline=True, decoder_threads=1))
    assert torch.get_num_threads() == before
    # torch.set_num_threads in the worker also sets what threads started later get; put back too.
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [before]


def test_closing_early_stops_the_decoder_thread(gpt: GPT, tokenizer: DARTokenizer) -> None:
    threads_before = {t.name for t in threading.enumerate()}
    steps = stream(gpt, tokenizer, torch.tensor([1, 2]), seeds=[1, 2], pipeline=True)
    first = next(steps)
    assert first.groups == 1
    steps.close()
    leftover = {t.name for t in threading.enumerate()} - threads_before
    assert not any(name.startswith("dar-pixel-decoder") for name in leftover)


def test_decoder_errors_reach_the_caller(gpt: GPT, tokenizer: DARTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("pixel decoder exploded")

    monkeypatch.setattr(tokenizer, "sampler_step", broken)
    with pytest.raises(RuntimeError, match="pixel decoder exploded"):
        list(stream(gpt, tokenizer, torch.tensor([1]), seeds=[1], pipeline=True))


def test_defaults_and_bad_arguments(gpt: GPT, tokenizer: DARTokenizer) -> None:
    assert default_pipeline("cpu") == ("cpu" in PIPELINE_BY_DEFAULT)
    assert default_pipeline(torch.device("cuda", 0)) == ("cuda" in PIPELINE_BY_DEFAULT)
    with pytest.raises(ValueError, match="decoder_threads"):
        stream(gpt, tokenizer, torch.tensor([1]), seeds=[1], decoder_threads=0)
    default = list(stream(gpt, tokenizer, torch.tensor([2]), seeds=[4]))
    explicit = list(stream(gpt, tokenizer, torch.tensor([2]), seeds=[4], pipeline=default_pipeline("cpu")))
    assert_same_records(default, explicit)


def test_sample_cli_pipeline_flags_give_the_same_files(tmp_path: Path, gpt: GPT) -> None:
    gpt_dir = gpt.save_pretrained(tmp_path / "gpt")
    tok_dir = make_tokenizer(tmp_path / "tok")
    outputs = {}
    for flag in ("--pipeline", "--no-pipeline"):
        out = tmp_path / flag.strip("-")
        out.mkdir()
        sample_main(["--gpt-ckpt", str(gpt_dir), "--tokenizer-ckpt", str(tok_dir), "--labels", "1,2",
                     "--samples-per-label", "1", "--cfg-scale", "2.0", "--device", "cpu", "--out", str(out / "grid.png"),
                     "--previews", str(out / "previews.png"), flag])
        outputs[flag] = [(out / name).read_bytes() for name in ("grid.png", "previews.png")]
    assert outputs["--pipeline"] == outputs["--no-pipeline"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream path needs a CUDA device")
def test_cuda_side_stream_records_equal_sequential(gpt: GPT, tokenizer: DARTokenizer) -> None:
    device = torch.device("cuda")
    gpt_cuda, tok_cuda = random_gpt().to(device), tokenizer.to(device)
    labels = torch.tensor([1, 2, 3], device=device)
    try:
        runs = [list(stream(gpt_cuda, tok_cuda, labels, cfg_scale=CFG, seeds=[1, 2, 3], pipeline=p))
                for p in (False, True)]
        assert_same_records(*runs)
    finally:
        tokenizer.to("cpu")


def test_benchmark_tiny_runs_and_checks_equality(tmp_path: Path) -> None:
    result = benchmark_streaming.main(["--tiny", "--repeats", "1", "--json", str(tmp_path / "bench.json")])
    assert result["outputs_equal"] is True
    assert set(result["sequential"]) == {"first", "final"} and (tmp_path / "bench.json").is_file()
