"""SamplingOptions: one checked value for guidance, temperature, top-k and top-p, accepted by every sampling call."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from autoregressive import GuidanceSchedule, SamplingOptions, sample_images, stream
from autoregressive.generate import draw_uniforms, generate_codes, iter_codes
from autoregressive.sample import cfg_scale_arg, parse_args, sampling_options
from tests.extraction_testing import make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer
from utils.cli import guidance_scale, parse_guidance_scale


@pytest.fixture(scope="module")
def model():
    return random_gpt(seed=3)


def test_options_normalise_and_are_frozen():
    options = SamplingOptions(guidance=(1.2, 8), temperature=0, top_k=5, top_p=0.9)
    assert options.guidance == GuidanceSchedule(1.2, 8.0)
    assert SamplingOptions(guidance=3).guidance == GuidanceSchedule(3.0)
    assert SamplingOptions() == SamplingOptions(GuidanceSchedule(1.0), 1.0, 0, 1.0)
    with pytest.raises(AttributeError):
        options.top_k = 1  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(guidance=(float("inf"), 2.0)), "finite"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingOptions(**kwargs)


@pytest.mark.parametrize("guidance", ["1.2,8.0", (1.0, 2.0, 3.0), ("1", 2.0), None])
def test_bad_guidance_types_are_type_errors(guidance):
    with pytest.raises(TypeError, match="guidance must be a float, a \\(start, end\\) tuple"):
        SamplingOptions(guidance=guidance)


def test_generate_takes_options_or_keywords_not_both(model):
    labels, seeds = torch.tensor([1, 2, 3]), [7, 8, 9]
    keywords = model.generate(labels, cfg_scale=(1.5, 3.0), temperature=0.8, top_k=10, top_p=0.9, seeds=seeds)
    options = SamplingOptions(guidance=(1.5, 3.0), temperature=0.8, top_k=10, top_p=0.9)
    assert torch.equal(model.generate(labels, seeds=seeds, options=options), keywords)
    uniforms = draw_uniforms(3, 16, seeds=seeds)
    assert torch.equal(generate_codes(model, labels, uniforms, options=options), keywords)
    assert torch.equal(torch.stack(list(iter_codes(model, labels, uniforms, options=options)), dim=1), keywords)
    with pytest.raises(TypeError, match="cfg_scale, top_k, not both"):
        model.generate(labels, cfg_scale=2.0, top_k=3, options=options)
    with pytest.raises(TypeError, match="guidance, not both"):
        generate_codes(model, labels, uniforms, guidance=GuidanceSchedule(2.0), options=options)
    with pytest.raises(TypeError, match="SamplingOptions"):
        model.generate(labels, options={"top_k": 3})


def test_cfg_scale_of_a_wrong_type_is_a_type_error(model):
    with pytest.raises(TypeError, match=r"cfg_scale must be a float or a \(start, end\) tuple"):
        model.generate(torch.tensor([1]), cfg_scale=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="cfg_scale must be a float"):
        model.generate(torch.tensor([1]), cfg_scale=None)


def test_string_cfg_scale_is_a_type_error_naming_the_tuple_form(model):
    """No library call parses text: a string (deprecated with a FutureWarning before) is refused."""
    labels = torch.tensor([1, 2])
    for call in (lambda: model.generate(labels, cfg_scale="1.5,3.0", seeds=[3, 4]),
                 lambda: SamplingOptions.resolve(None, "4.0"),
                 lambda: GuidanceSchedule.from_value("1.5,3.0")):
        with pytest.raises(TypeError, match=r"a string is not a guidance scale; pass a float or a \(start, end\) "
                                            r"tuple, e.g. cfg_scale=\(1.2, 8.0\)"):
            call()
    with pytest.raises(TypeError, match="parse_guidance_scale"):
        SamplingOptions(guidance="1.5,3.0")
    assert not hasattr(GuidanceSchedule, "parse")


def test_guidance_text_is_parsed_at_the_command_line_edge():
    """What GuidanceSchedule.parse did, now the CLI's: "S" or "START,END" numbers, finite."""
    assert parse_guidance_scale("4.0") == 4.0
    assert parse_guidance_scale(" 1.2, 8.0 ") == (1.2, 8.0)
    assert cfg_scale_arg("4.0") == GuidanceSchedule(4.0)
    assert cfg_scale_arg(" 1.2, 8.0 ") == GuidanceSchedule(1.2, 8.0)
    for bad in ("", "a", "1,2,3", "1,"):
        with pytest.raises(ValueError):
            parse_guidance_scale(bad)
        with pytest.raises(argparse.ArgumentTypeError, match="e.g. 4.0 or 1.2,8.0"):
            guidance_scale(bad)
    with pytest.raises(ValueError, match="finite"):
        parse_guidance_scale("nan")
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        cfg_scale_arg("inf,2")


def test_stream_and_sample_images_take_options(tmp_path):
    gpt, tokenizer = random_gpt(), DARTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    labels, seeds = torch.tensor([1, 2]), [5, 6]
    options = SamplingOptions(guidance=(1.5, 3.0), top_k=20)
    codes, images = sample_images(gpt, tokenizer, labels, cfg_scale=(1.5, 3.0), top_k=20, seeds=seeds)
    codes2, images2 = sample_images(gpt, tokenizer, labels, options=options, seeds=seeds)
    assert torch.equal(codes, codes2) and torch.equal(images, images2)
    last = list(stream(gpt, tokenizer, labels, options=options, seeds=seeds))[-1]
    assert torch.equal(last.codes, codes)


def test_cli_builds_options_once_from_flags():
    args = parse_args(["--gpt-ckpt", "g", "--tokenizer-ckpt", "t", "--labels", "1", "--out", "x.png",
                       "--cfg-scale", "1.2,8.0", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.8"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI edge parses the text itself: no deprecated path
        options = sampling_options(args)
    assert options == SamplingOptions(GuidanceSchedule(1.2, 8.0), 0.5, 7, 0.8)
