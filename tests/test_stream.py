"""Streaming previews: exact final image, consistent previews, prefixes, per-sample randomness."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from autoregressive import GPT, GPT_PRESETS, sample_images, stream
from autoregressive.stream import check_pair, image_seed, noise_seed, seeded_noise
from tests.extraction_testing import make_tokenizer
from tests.gpt_testing import random_gpt
from tokenizer import DARTokenizer

CFG = (1.5, 4.0)


@pytest.fixture(scope="module")
def gpt() -> GPT:
    return random_gpt()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> DARTokenizer:
    return DARTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def per_group(tokenizer: DARTokenizer) -> int:
    return tokenizer.config.num_all_queries // tokenizer.config.num_query_groups


@pytest.mark.parametrize("sampler", ["adams2", "euler"])
def test_streamed_final_image_equals_decode_of_generate(gpt: GPT, tokenizer: DARTokenizer, sampler: str) -> None:
    labels, seeds = torch.tensor([1, 2, 3]), [11, 12, 13]
    steps = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, sampler=sampler))
    codes = gpt.generate(labels, CFG, seeds=seeds)
    image = tokenizer.decode(codes, noise=seeded_noise(tokenizer, seeds), sampler=sampler)
    assert torch.equal(steps[-1].codes, codes)
    assert torch.equal(steps[-1].preview, image)  # bit for bit, not just close
    plain_codes, plain_images = sample_images(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds, sampler=sampler)
    assert torch.equal(plain_codes, codes) and torch.equal(plain_images, image)


def test_one_record_per_group(gpt: GPT, tokenizer: DARTokenizer) -> None:
    groups = tokenizer.config.num_query_groups
    steps = list(stream(gpt, tokenizer, torch.tensor([0, 5]), seeds=[1, 2]))
    assert [s.groups for s in steps] == list(range(1, groups + 1))
    assert [s.steps for s in steps] == list(range(1, groups + 1))  # one pixel step per group (S = G)
    assert [s.final for s in steps] == [False] * (groups - 1) + [True]
    for s in steps:
        assert s.codes.shape == (2, s.groups * per_group(tokenizer))
        assert s.preview.shape == (2, 3, 32, 32)
        assert torch.equal(s.codes, steps[-1].codes[:, : s.codes.shape[1]])


def test_generator_streams_equal_plain_sampling(gpt: GPT, tokenizer: DARTokenizer) -> None:
    labels = torch.tensor([4, 4])
    last = list(stream(gpt, tokenizer, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3)))[-1]
    codes, images = sample_images(gpt, tokenizer, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(last.codes, codes) and torch.equal(last.preview, images)


def test_preview_k_is_unaffected_by_later_groups(gpt: GPT, tokenizer: DARTokenizer) -> None:
    labels, noise = torch.tensor([7, 8]), seeded_noise(tokenizer, [5, 6])
    first = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=[5, 6]))
    k = 2
    kept = first[-1].codes[:, : k * per_group(tokenizer)]
    # Same first k groups and noise, different randomness for everything after them.
    second = list(stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=[50, 60], noise=noise, prefix_codes=kept))
    assert not torch.equal(first[-1].codes, second[-1].codes), "the later groups must actually differ"
    for a, b in zip(first[:k], second[:k]):
        assert torch.equal(a.preview, b.preview)
    assert not torch.equal(first[-1].preview, second[-1].preview)


def test_previews_are_decodes_of_the_code_prefix(gpt: GPT, tokenizer: DARTokenizer) -> None:
    seeds = [21, 22]
    steps = list(stream(gpt, tokenizer, torch.tensor([1, 9]), seeds=seeds))
    noise = seeded_noise(tokenizer, seeds)
    for s in steps:
        expected = tokenizer.decode(s.codes, noise=noise, steps=s.groups)
        # Prefix-shaped condition matmuls round differently; the values agree to float noise.
        torch.testing.assert_close(s.preview, expected, rtol=1e-4, atol=1e-4)


def test_prefix_codes_are_kept_verbatim(gpt: GPT, tokenizer: DARTokenizer) -> None:
    prefix = torch.tensor([3, 1, 4, 1, 5, 9])  # 1.5 groups: a prefix need not end on a group boundary
    labels = torch.tensor([2, 3, 4])
    for s in stream(gpt, tokenizer, labels, cfg_scale=CFG, seeds=[1, 2, 3], prefix_codes=prefix):
        n = min(s.codes.shape[1], prefix.numel())
        assert torch.equal(s.codes[:, :n], prefix[:n].expand(3, -1))
    codes, _ = sample_images(gpt, tokenizer, labels, cfg_scale=CFG, seeds=[1, 2, 3], prefix_codes=prefix)
    assert torch.equal(codes[:, :6], prefix.expand(3, -1))


def test_images_depend_only_on_seed_and_label(gpt: GPT, tokenizer: DARTokenizer) -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    seeds = [image_seed(9, i) for i in range(8)]
    batch_codes, batch_images = sample_images(gpt, tokenizer, labels, cfg_scale=CFG, seeds=seeds)
    for i in (0, 5):
        last = list(stream(gpt, tokenizer, labels[i : i + 1], cfg_scale=CFG, seeds=seeds[i : i + 1]))[-1]
        assert torch.equal(last.codes, batch_codes[i : i + 1])
        # Codes are exact; pixel matmuls may round differently with the batch size (CPU GEMM blocking).
        torch.testing.assert_close(last.preview, batch_images[i : i + 1], rtol=1e-4, atol=1e-4)
    assert torch.equal(seeded_noise(tokenizer, seeds[5:6]), seeded_noise(tokenizer, seeds)[5:6])


def test_noise_stream_is_not_the_code_stream() -> None:
    assert noise_seed(7) != 7 and noise_seed(7) != noise_seed(8)
    assert image_seed(0, 1) != image_seed(1, 0)
    with pytest.raises(ValueError):
        noise_seed(-1)


def test_bad_arguments_raise(gpt: GPT, tokenizer: DARTokenizer) -> None:
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match="seeds or generator"):
        stream(gpt, tokenizer, labels, seeds=[1], generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\(B,\)"):
        stream(gpt, tokenizer, labels[None], seeds=[1])
    other = GPT(replace(GPT_PRESETS["tiny"], vocab_size=32)).eval()
    with pytest.raises(ValueError, match="does not match the tokenizer"):
        check_pair(other, tokenizer)
    with pytest.raises(ValueError, match="does not match the tokenizer"):
        sample_images(other, tokenizer, labels, seeds=[1])
