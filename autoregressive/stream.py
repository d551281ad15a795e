"""Class label → image, streamed group by group: consistent previews (docs/method.md intro, §1 "Groups").

Because denoising step k of the tokenizer's pixel decoder reads only code group k (and the code
decoder is causal), an image can be shown while the GPT is still writing its codes: after each group
the pixel sampler advances by the steps that group unlocks and its "jump to t = 1" estimate is the
preview. :func:`stream` does exactly that, continuing the GPT from its KV cache and the pixel sampler
from its state, so streaming costs one extra code-decoder pass per group and nothing else.

Exactness. The final streamed image is bit-identical to ``tokenizer.decode(gpt.generate(...))``
with the same randomness (:func:`sample_images`). Computing the condition tokens of a prefix on the
prefix alone changes matmul shapes and hence the float rounding (~1e-6), so instead every group's
condition tokens come from the code decoder run on the *full-length* sequence with the not-yet-known
codes set to 0: the decoder is causal, so those placeholders cannot reach earlier rows, and with
equal shapes each row is computed by exactly the same kernels as in ``decode``.

Randomness. With ``seeds`` every sample b draws its code uniforms from ``seeds[b]`` (see
:func:`autoregressive.generate.draw_uniforms`) and its pixel noise from :func:`noise_seed` of it, so
a sample's codes depend only on its seed and label and its image (up to float rounding that can
differ with the batch size) on nothing else either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from autoregressive.generate import GuidanceSchedule, SamplingOptions, draw_uniforms, generate_codes, iter_codes
from utils.errors import UserError

if TYPE_CHECKING:
    from autoregressive.model import GPT
    from tokenizer.flow import SequentialSampler
    from tokenizer.model import DARTokenizer

# Mixed into a sample's seed to get its pixel-noise seed, so that the noise is not drawn from the
# very same Mersenne-Twister stream as the code uniforms.
NOISE_STREAM = 0x5EED_0F_A1
# Placeholder for codes not generated yet: any valid code works, the causal code decoder never reads it.
PLACEHOLDER_CODE = 0


@dataclass(frozen=True)
class StreamStep:
    """What :func:`stream` yields after each group of codes. Shapes: B samples, n = groups·N/G codes."""

    groups: int  # code groups received so far, 1..num_groups
    num_groups: int  # G
    codes: torch.Tensor  # (B, n) int64, on the GPT's device
    preview: torch.Tensor | None  # (B, C, H, W) image after the unlocked steps; None before the first step
    steps: int  # pixel-sampler steps run so far

    @property
    def final(self) -> bool:
        return self.groups == self.num_groups


class ModelPairError(UserError, ValueError):
    """The GPT was not trained on this tokenizer's codes."""


def check_pair(gpt: "GPT", tokenizer: "DARTokenizer") -> int:
    """Raise unless the GPT models this tokenizer's codes; return the codes per group (N / G)."""
    tok, cfg = tokenizer.config, gpt.config
    if cfg.block_size != tok.num_all_queries or cfg.vocab_size != tok.vq_codebook_size:
        raise ModelPairError(
            f"GPT (block_size {cfg.block_size}, vocab {cfg.vocab_size}) does not match the tokenizer "
            f"({tok.num_all_queries} codes from a codebook of {tok.vq_codebook_size}); pass the tokenizer "
            "whose codes the GPT was trained on"
        )
    if tok.num_all_queries % tok.num_query_groups:
        raise ValueError(f"{tok.num_all_queries} codes do not split into {tok.num_query_groups} equal groups")
    return tok.num_all_queries // tok.num_query_groups


def _mix(*words: int) -> int:
    """A 63-bit seed hashed from non-negative integers (SeedSequence: nearby inputs decorrelate)."""
    if min(words) < 0:
        raise ValueError(f"seeds and indices must be >= 0, got {words}")
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a run with global ``seed``: CLIs seed image i by (seed, i) only."""
    return _mix(seed, index)


def noise_seed(seed: int) -> int:
    """The pixel-noise seed of a sample whose codes use ``seed``."""
    return _mix(seed, NOISE_STREAM)


def seeded_noise(tokenizer: "DARTokenizer", seeds: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Pixel-sampler start noise (B, C, R, R), sample b drawn on the CPU from :func:`noise_seed` (seeds[b])."""
    seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    if not seed_list:
        raise ValueError("seeded_noise needs at least one seed")
    rows = [tokenizer.make_noise(1, torch.Generator().manual_seed(noise_seed(int(s)))) for s in seed_list]
    return torch.cat(rows)


def draw_randomness(
    gpt: "GPT",
    tokenizer: "DARTokenizer",
    batch: int,
    *,
    seeds: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(code uniforms (B, N), pixel noise (B, C, R, R)) for one batch; shared by streamed and plain sampling.

    ``seeds``: per-sample streams (see the module docstring). ``generator``: the uniforms first,
    then the noise, from that one generator. Neither: the global RNGs. An explicit ``noise``
    replaces the drawn noise (the uniforms are drawn as usual).
    """
    if seeds is not None and generator is not None:
        raise ValueError("pass seeds or generator, not both")
    uniforms = draw_uniforms(batch, gpt.config.block_size, seeds=seeds, generator=generator, device=device)
    if noise is None:
        noise = seeded_noise(tokenizer, seeds) if seeds is not None else tokenizer.make_noise(batch, generator)
    return uniforms, noise


def _sampling_inputs(gpt: "GPT", tokenizer: "DARTokenizer", labels: torch.Tensor, seeds, generator,
                     noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels on the GPT's device, uniforms (B, N), noise) after checking the labels' shape."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        raise ValueError(f"labels must be a (B,) tensor, got {labels!r}")
    gpt.check_labels(labels, allow_null=False)  # real classes only: guidance adds the null class itself
    labels = labels.to(gpt.device)
    uniforms, noise = draw_randomness(gpt, tokenizer, labels.shape[0], seeds=seeds, generator=generator,
                                      noise=noise, device=labels.device)
    return labels, uniforms, noise


def stream(
    gpt: "GPT",
    tokenizer: "DARTokenizer",
    labels: torch.Tensor,
    *,
    cfg_scale: float | tuple[float, float] | GuidanceSchedule = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    prefix_codes: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sampler: str = "adams2",
    compile: bool = False,
    options: SamplingOptions | None = None,
) -> Iterator[StreamStep]:
    """Generate images for labels (B,), yielding a :class:`StreamStep` after each of the G code groups.

    ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``prefix_codes`` ((k,) or (B, k), kept
    verbatim), ``compile`` and ``options`` are those of :meth:`GPT.generate`; ``seeds`` / ``generator`` /
    ``noise`` are described in :func:`draw_randomness`; ``sampler`` is "adams2" or "euler". The last
    step's preview is the final image, equal to :func:`sample_images` with the same arguments.
    Arguments are validated when this is called, before the first step is requested.
    """
    per_group = check_pair(gpt, tokenizer)
    options = SamplingOptions.resolve(options, cfg_scale, temperature, top_k, top_p)
    labels, uniforms, noise = _sampling_inputs(gpt, tokenizer, labels, seeds, generator, noise)
    columns = iter_codes(gpt, labels, uniforms, options=options, prefix_codes=prefix_codes, compile=compile)
    state = tokenizer.start_sampler(labels.shape[0], noise, sampler=sampler)
    return _stream_body(tokenizer, columns, state, per_group)


@torch.no_grad()
def _stream_body(tokenizer: "DARTokenizer", columns: Iterator[torch.Tensor], state: "SequentialSampler",
                 per_group: int) -> Iterator[StreamStep]:
    schedule = tokenizer.schedule
    num_groups = tokenizer.config.num_query_groups
    # The same length decode() feeds the code decoder, so every row sees identical matmul shapes.
    cond_len = schedule.tokens_needed(state.num_steps)
    received: list[torch.Tensor] = []
    padded: torch.Tensor | None = None
    preview = None
    for column in columns:
        received.append(column)
        if len(received) % per_group:
            continue
        codes = torch.stack(received, dim=1)  # (B, n)
        n = codes.shape[1]
        if not state.done and schedule.window(state.step_index)[1] <= n:
            if padded is None:
                padded = torch.full((codes.shape[0], cond_len), PLACEHOLDER_CODE, dtype=torch.long,
                                    device=tokenizer.device)
            known = min(n, cond_len)
            padded[:, :known] = codes[:, :known].to(tokenizer.device)
            cond = tokenizer.cond_from_codes(padded)  # (B, cond_len, D)
            while not state.done and schedule.window(state.step_index)[1] <= n:
                preview = tokenizer.sampler_step(state, cond, preview=True)
        yield StreamStep(groups=n // per_group, num_groups=num_groups, codes=codes, preview=preview,
                         steps=state.step_index)


@torch.no_grad()
def sample_images(
    gpt: "GPT",
    tokenizer: "DARTokenizer",
    labels: torch.Tensor,
    *,
    cfg_scale: float | tuple[float, float] | GuidanceSchedule = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    prefix_codes: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sampler: str = "adams2",
    compile: bool = False,
    options: SamplingOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-streamed sampling: (codes (B, N), images (B, C, H, W) unclamped) = generate, then decode.

    Same arguments and randomness as :func:`stream`; use this when no previews are wanted.
    """
    check_pair(gpt, tokenizer)
    options = SamplingOptions.resolve(options, cfg_scale, temperature, top_k, top_p)
    labels, uniforms, noise = _sampling_inputs(gpt, tokenizer, labels, seeds, generator, noise)
    codes = generate_codes(gpt, labels, uniforms, options=options, prefix_codes=prefix_codes, compile=compile)
    return codes, tokenizer.decode(codes, noise=noise, sampler=sampler)
