"""The fast inference paths (tokenizer/inference.py) reproduce the module-by-module reference path.

Float32 results are bit-identical on the machines we measured; the assertions allow 1e-6 relative so
that a CPU whose kernels round differently (another SIMD width) does not fail them. Codes must be equal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from scripts import benchmark_tokenizer
from tokenizer import TOKENIZER_PRESETS, DARTokenizer, inference, load_tokenizer_from_official

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.pt"


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    scale = reference.abs().max().item()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6 * scale)


def random_tokenizer(seed: int = 0, **changes) -> DARTokenizer:
    """Tiny tokenizer with every float tensor random (the official init zeroes gates and output layers)."""
    pixel = changes.pop("diff_decoder", {})
    config = TOKENIZER_PRESETS["tiny"]
    config = dataclasses.replace(config, diff_decoder=dataclasses.replace(config.diff_decoder, **pixel), **changes)
    model = DARTokenizer(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


CONFIGS = {
    "tiny": {},
    # Q = 8 > N/G = 4: consecutive windows overlap and the last two steps read the same clipped window.
    "overlapping_windows": {"queries_per_step": 8},
    # A shared time embedding and the DiT-style final layer (the official mlp_head option).
    "mlp_head": {"diff_decoder": {"mlp_head": True, "share_time_encoding": True}},
    "full_rank_queries": {"query_low_rank": False, "num_encoder_layers": 1},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> DARTokenizer:
    return random_tokenizer(**CONFIGS[request.param])


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("size", [32, 48])
def test_encode_matches_reference(model: DARTokenizer, size: int) -> None:
    x = images(3, size, seed=size)
    with torch.no_grad():
        assert_same(inference.encode_latents(model, x), model.encode_latents(x))
    assert torch.equal(model.encode(x), model.encode(x, reference=True))


def test_quantize_codes_in_row_blocks_equal_the_quantizer(model: DARTokenizer) -> None:
    latents = torch.randn(5, 16, model.config.vq_dim, generator=torch.Generator().manual_seed(3))
    codebook = model.quantize.codebook()
    expected, _, _ = model.quantize(latents)
    for rows in (1, 7, 128):
        assert torch.equal(inference.quantize_codes(codebook, latents, rows=rows), expected)


@pytest.mark.parametrize("sampler", ["adams2", "euler"])
def test_previews_and_decode_match_reference(model: DARTokenizer, sampler: str) -> None:
    codes = model.encode(images(2, 32, seed=1))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fast = model.previews(codes, noise=noise, sampler=sampler)
    reference = model.previews(codes, noise=noise, sampler=sampler, reference=True)
    assert len(fast) == len(reference) == model.config.num_denoising_steps
    for ours, theirs in zip(fast, reference):
        assert_same(ours, theirs)
    assert_same(model.decode(codes, noise=noise, sampler=sampler), reference[-1])
    prefix = codes[:, : model.schedule.tokens_needed(2)]
    assert_same(model.decode(prefix, noise=noise, steps=2, sampler=sampler),
                model.decode(prefix, noise=noise, steps=2, sampler=sampler, reference=True))


def test_decode_of_another_size_matches_reference(model: DARTokenizer) -> None:
    codes = model.encode(images(1, 32, seed=4))
    noise = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(5))
    assert_same(model.decode(codes, noise=noise), model.decode(codes, noise=noise, reference=True))


def test_sampler_step_is_one_step_of_decode(model: DARTokenizer) -> None:
    """The streaming primitive computes what decode computes, in both paths (autoregressive/stream.py relies on it)."""
    codes = model.encode(images(2, 32, seed=6))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    previews = model.previews(codes, noise=noise)
    cond = model.cond_from_codes(codes)
    for reference in (False, True):
        state = model.start_sampler(2, noise=noise)
        for k in range(model.config.num_denoising_steps):
            preview = model.sampler_step(state, cond, reference=reference)
            assert_same(preview, previews[k])


def test_fused_projections_follow_weight_changes() -> None:
    model = random_tokenizer(seed=3)
    codes = model.encode(images(1, 32, seed=8))
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    before = model.decode(codes, noise=noise)
    with torch.no_grad():  # in place, as an optimizer step does
        for block in model.pixel_decoder.blocks:
            block.attention.v.weight.mul_(1.5)
        model.encoder_layers[0].attention.k.bias.add_(0.5)
    after = model.decode(codes, noise=noise)
    assert not torch.equal(before, after)
    assert_same(after, model.decode(codes, noise=noise, reference=True))
    assert torch.equal(model.encode(images(2, 32, seed=10)), model.encode(images(2, 32, seed=10), reference=True))
    replaced = model.pixel_decoder.blocks[0].attention.q
    replaced.weight = torch.nn.Parameter(replaced.weight.detach() * 0.5)  # a new tensor, as load_state_dict(assign=True)
    assert_same(model.decode(codes, noise=noise), model.decode(codes, noise=noise, reference=True))


def test_golden_tokenizer_fast_equals_reference() -> None:
    golden = torch.load(GOLDEN, weights_only=True)
    model = load_tokenizer_from_official(golden["tok.state_dict"], golden["tok.config"])
    codes = model.encode(golden["tok.images"])
    assert torch.equal(codes, golden["tok.codes"])
    assert torch.equal(codes, model.encode(golden["tok.images"], reference=True))
    fast = model.previews(codes, noise=golden["tok.noise"])
    reference = model.previews(codes, noise=golden["tok.noise"], reference=True)
    for ours, theirs in zip(fast, reference):
        assert_same(ours, theirs)


def test_bf16_decode_option() -> None:
    model = random_tokenizer(seed=4)
    codes = model.encode(images(1, 32, seed=11))
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    full = model.decode(codes, noise=noise)
    low = model.decode(codes, noise=noise, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    assert benchmark_tokenizer.psnr(low, full) > 20  # bf16 rounding, not a different image
    assert torch.equal(model.decode(codes, noise=noise, dtype=torch.float32), full)
    with pytest.raises(ValueError, match="dtype must be one of"):
        model.decode(codes, noise=noise, dtype=torch.int8)


def test_fast_paths_run_under_autocast() -> None:
    """tokenizer.reconstruct and extract_codes wrap encode/decode in autocast for --precision bf16."""
    model = random_tokenizer(seed=5)
    x = images(2, 32, seed=13)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.encode(x)
        fast = model.decode(codes, noise=noise)
        reference = model.decode(codes, noise=noise, reference=True)
    assert codes.shape == (2, 16) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=0.05, atol=0.05)


def test_benchmark_tiny_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = benchmark_tokenizer.main(["--tiny", "--repeats", "1", "--json", str(tmp_path / "bench.json")])
    assert report["encode"]["codes_equal"] and report["decode"]["within_tolerance"]
    assert report["decode_bf16"]["psnr_vs_fp32_db"] > 20
    out = capsys.readouterr().out
    assert "speed-up" in out and "codes equal: True" in out
    assert (tmp_path / "bench.json").is_file()


@pytest.mark.parametrize("rows", [None, 4, 20])
def test_encoder_attention_split_equals_one_masked_call(rows: int | None) -> None:
    """Patch rows attend to the patch keys alone; query rows use their mask rows (encoder fast path)."""
    model = random_tokenizer(seed=6)
    layer = model.encoder_layers[0]
    attention, patches, queries = layer.attention, 6, model.config.num_all_queries
    length = patches + queries
    generator = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, length, attention.num_heads, attention.head_dim, generator=generator) for _ in range(3))
    mask = model._encoder_mask(patches, torch.device("cpu"))  # (P+N, P+N) bool
    expected = attention.proj(torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2).flatten(2))
    query_mask = inference.additive_mask(mask[patches:], q.dtype)
    first = 0 if rows is None else length - rows
    with torch.no_grad():
        ours = inference._encoder_attend(attention, q[:, first:], k, v, query_mask, patches)
    assert_same(ours, expected[:, first:].detach())


def test_workspace_linear_equals_linear() -> None:
    generator = torch.Generator().manual_seed(16)
    weight, bias = torch.randn(24, 16, generator=generator), torch.randn(24, generator=generator)
    workspace = inference.Workspace()
    with torch.no_grad():
        for shape in [(2, 10, 16), (2, 4, 16), (3, 12, 16)]:  # fewer rows reuse a prefix, more rows reallocate
            x = torch.randn(*shape, generator=generator)
            assert torch.equal(workspace.linear("a", x, weight, bias), torch.nn.functional.linear(x, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # falls back to the autocast linear
            assert workspace.linear("a", x, weight, bias).dtype == torch.bfloat16
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = workspace.linear("a", x, weight, bias)  # autograd: a fresh result that carries the graph
    out.sum().backward()
    assert x.grad is not None


def test_pixel_decoder_session_reused_across_sizes_matches_reference() -> None:
    """One session's buffers serve calls of different token counts without mixing them up."""
    model = random_tokenizer(seed=7)
    decoder = model.pixel_decoder
    cond = model.cond_from_codes(model.encode(images(1, 32, seed=17)))
    session = inference.PixelDecoderSession(decoder, cond)
    generator = torch.Generator().manual_seed(18)
    t = torch.tensor([0.3])
    with torch.no_grad():
        for height, width in [(32, 32), (48, 40), (16, 16), (32, 32)]:
            x = torch.randn(1, 3, height, width, generator=generator)
            assert_same(session.velocity(x, t, 0, 4), decoder(x, t, cond[:, 0:4]))
