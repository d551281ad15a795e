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

Pipelining (``pipeline=True``). Pixel step k needs code groups ≤ k only, so it can run while the
GPT writes group k + 1 instead of after it. On CUDA the pixel decoder runs on a side stream, ordered
after group k's codes by an event, so one host thread keeps both streams busy; on the CPU it runs in
a worker thread (torch releases the GIL in its ops) with the caller's intra-op thread count. A
finished group is yielded as soon as its pixel steps are done (checked between GPT tokens). Both
paths make the same calls on the same operands, so the records are identical, previews included,
bit for bit in fp32 (tests/test_stream_pipelining.py). ``decoder_threads`` gives the CPU worker
another thread count; CPU kernels may split their sums by thread count, so that can change the
rounding (~1e-5 measured on the tiny models) and is not exact. Default (``pipeline=None``): the
path measured faster on the device, see :data:`PIPELINE_BY_DEFAULT` and docs/performance.md,
"Streaming (D-AR pipelining)". CPU default: sequential. On the 2-core machine where this was written
(shared, load ≈ 10, ``OMP_WAIT_POLICY=PASSIVE``) GPT-B + tokenizer v1 decoding at 128² gave first
preview 5.29 / 5.71 s sequential vs 6.32 / 6.76 s pipelined and final image 40.70 / 61.10 s vs
39.76 / 43.68 s (min / median, 3 repeats): the first preview comes later, the final image no
earlier by the min. The tiny models with ``OMP_WAIT_POLICY=PASSIVE`` gave first preview 0.02 / 0.13 s
sequential vs 0.05 / 0.10 s pipelined and final image 0.08 / 0.35 s vs 0.16 / 0.18 s (min / median,
5 repeats): no gain beyond the noise; two busy threads per core have no idle core to fill. With
libgomp's default spin-waiting the pipelined path looked 9-17x faster there (final 0.75 / 2.0 s vs
12.6 / 17.9 s), but only because four OpenMP threads on two cores switch libgomp to short spins,
which an overloaded machine rewards: an artifact, not pipelining. The 256² run did not finish on
that machine in the time available. CUDA default: pipelined, by construction (the side stream
overlaps at no host cost); not measured on a GPU yet (scripts/benchmark_streaming.py --device cuda).

Randomness. With ``seeds`` every sample b draws its code uniforms from ``seeds[b]`` (see
:func:`autoregressive.generate.draw_uniforms`) and its pixel noise from :func:`noise_seed` of it, so
a sample's codes depend only on its seed and label and its image (up to float rounding that can
differ with the batch size) on nothing else either.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
# Device types where the pipelined path is the default (see the module docstring for the measurements).
PIPELINE_BY_DEFAULT = ("cuda",)


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


def default_pipeline(device: torch.device | str) -> bool:
    """Whether :func:`stream` pipelines by default on this device: the faster path measured there."""
    return torch.device(device).type in PIPELINE_BY_DEFAULT


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
    pipeline: bool | None = None,
    decoder_threads: int | None = None,
) -> Iterator[StreamStep]:
    """Generate images for labels (B,), yielding a :class:`StreamStep` after each of the G code groups.

    ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``prefix_codes`` ((k,) or (B, k), kept
    verbatim), ``compile`` and ``options`` are those of :meth:`GPT.generate`; ``seeds`` / ``generator`` /
    ``noise`` are described in :func:`draw_randomness`; ``sampler`` is "adams2" or "euler". The last
    step's preview is the final image, equal to :func:`sample_images` with the same arguments.
    Arguments are validated when this is called, before the first step is requested.

    ``pipeline``: run the pixel steps of group k while the GPT generates group k + 1 (module
    docstring, "Pipelining"); the records are identical either way, only the timing changes. None
    picks :func:`default_pipeline` for the tokenizer's device. ``decoder_threads``: intra-op threads
    of the CPU decoder thread (default the caller's, the only exact choice).
    """
    per_group = check_pair(gpt, tokenizer)
    if decoder_threads is not None and decoder_threads < 1:
        raise ValueError(f"decoder_threads must be >= 1 or None, got {decoder_threads}")
    options = SamplingOptions.resolve(options, cfg_scale, temperature, top_k, top_p)
    labels, uniforms, noise = _sampling_inputs(gpt, tokenizer, labels, seeds, generator, noise)
    columns = iter_codes(gpt, labels, uniforms, options=options, prefix_codes=prefix_codes, compile=compile)
    state = tokenizer.start_sampler(labels.shape[0], noise, sampler=sampler)
    decoder = _GroupDecoder(tokenizer, state, per_group)
    if pipeline is None:
        pipeline = default_pipeline(tokenizer.device)
    if not pipeline:
        return _sequential_body(decoder, columns)
    return _pipelined_body(decoder, columns, gpt.device, decoder_threads)


class _GroupDecoder:
    """The pixel-decoder side of a stream: advances the sampler by the steps each code prefix unlocks.

    The sequential and the pipelined paths both call :meth:`advance` with the same prefixes in the
    same order, so they run the same operations on the same operands and their previews are equal.
    """

    def __init__(self, tokenizer: "DARTokenizer", state: "SequentialSampler", per_group: int) -> None:
        self.tokenizer = tokenizer
        self.per_group = per_group
        self.state = state
        # The same length decode() feeds the code decoder, so every row sees identical matmul shapes.
        self.cond_len = tokenizer.schedule.tokens_needed(state.num_steps)
        self.padded: torch.Tensor | None = None  # (B, cond_len) known codes, placeholders after them
        self.preview: torch.Tensor | None = None

    def unlocks(self, n: int) -> bool:
        """Whether a prefix of n codes unlocks the sampler's next step."""
        state = self.state
        return not state.done and self.tokenizer.schedule.window(state.step_index)[1] <= n

    @torch.no_grad()
    def advance(self, codes: torch.Tensor) -> StreamStep:
        """codes (B, n), the whole prefix so far → the record of this group (the latest preview)."""
        n = codes.shape[1]
        tokenizer = self.tokenizer
        if self.unlocks(n):
            if self.padded is None:
                self.padded = torch.full((codes.shape[0], self.cond_len), PLACEHOLDER_CODE, dtype=torch.long,
                                         device=tokenizer.device)
            known = min(n, self.cond_len)
            self.padded[:, :known] = codes[:, :known].to(tokenizer.device)
            # cond_from_codes minus its range check: the check reads the codes on the host, which on CUDA
            # would stall the pipelined path; the GPT's codes lie in the codebook (check_pair) by construction.
            cond = tokenizer.cond_from_quantized(tokenizer.quantize.lookup(self.padded))  # (B, cond_len, D)
            while self.unlocks(n):
                self.preview = tokenizer.sampler_step(self.state, cond, preview=True)
        return StreamStep(groups=n // self.per_group, num_groups=tokenizer.config.num_query_groups, codes=codes,
                          preview=self.preview, steps=self.state.step_index)


def _group_prefixes(columns: Iterator[torch.Tensor], per_group: int) -> Iterator[torch.Tensor]:
    """The (B, n) code prefixes at the end of each group, n = per_group, 2·per_group, ..."""
    received: list[torch.Tensor] = []
    for column in columns:
        received.append(column)
        if len(received) % per_group == 0:
            yield torch.stack(received, dim=1)


@torch.no_grad()
def _sequential_body(decoder: _GroupDecoder, columns: Iterator[torch.Tensor]) -> Iterator[StreamStep]:
    """Generate a group, then run the pixel steps it unlocks, then the next group: one thing at a time."""
    for codes in _group_prefixes(columns, decoder.per_group):
        yield decoder.advance(codes)


class _Job(Protocol):
    def ready(self) -> bool: ...

    def result(self) -> StreamStep: ...


class _ThreadLane:
    """CPU: the pixel decoder in one worker thread, its jobs run in submission order.

    torch releases the GIL inside its ops, so the GPT (this thread) and the decoder (the worker) run
    at once. Grad, inference and autocast modes are thread-local, so the worker copies the caller's.
    The worker's intra-op thread count is ``threads``, by default the caller's: CPU kernels may split
    their reductions by thread count, so only equal counts give the sequential path's numbers bit for
    bit. ``torch.set_num_threads`` also sets the count that threads started later inherit, so the
    caller's count is put back when the lane closes.
    """

    def __init__(self, device: torch.device, threads: int | None) -> None:
        caller_threads = torch.get_num_threads()
        threads = caller_threads if threads is None else threads
        inference = torch.is_inference_mode_enabled()
        autocast_on = torch.is_autocast_enabled(device.type)
        autocast_dtype = torch.get_autocast_dtype(device.type)

        def modes() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode(inference))
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_on))
            return stack

        self._modes = modes
        self._caller_threads = caller_threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dar-pixel-decoder",
                                        initializer=torch.set_num_threads, initargs=(threads,))

    def submit(self, decoder: _GroupDecoder, codes: torch.Tensor) -> _Job:
        def run() -> StreamStep:
            with self._modes():
                return decoder.advance(codes)

        future = self._pool.submit(run)

        class Job:
            def ready(self) -> bool:
                return future.done()

            def result(self) -> StreamStep:
                return future.result()

        return Job()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._caller_threads)


class _CudaLane:
    """CUDA: the pixel decoder on a side stream; one host thread enqueues both models' kernels.

    Each job waits (on the GPU) for an event recorded on the GPT's stream after its codes, so the
    host never blocks; readiness is polled with an event query between GPT tokens.
    """

    def __init__(self, device: torch.device, decoder: _GroupDecoder) -> None:
        self._main = torch.cuda.current_stream(device)
        self._side = torch.cuda.Stream(device)
        # Made on the caller's stream, read on the side one: the allocator must not hand them out again
        # to the caller's stream before the side stream is done with them.
        for tensor in (decoder.state.x, decoder.state.sigmas, decoder.state._steps):
            tensor.record_stream(self._side)

    def submit(self, decoder: _GroupDecoder, codes: torch.Tensor) -> _Job:
        main, side = self._main, self._side
        codes_ready = torch.cuda.Event()
        codes_ready.record(main)
        side.wait_event(codes_ready)
        codes.record_stream(side)  # allocated on the GPT's stream, read on this one
        with torch.cuda.stream(side):
            step = decoder.advance(codes)
        done = torch.cuda.Event()
        done.record(side)

        class Job:
            def ready(self) -> bool:
                return done.query()

            def result(self) -> StreamStep:
                main.wait_event(done)
                if step.preview is not None:
                    step.preview.record_stream(main)  # allocated on the side stream, read on the caller's
                return step

        return Job()

    def close(self) -> None:
        self._main.wait_stream(self._side)


@torch.no_grad()
def _pipelined_body(decoder: _GroupDecoder, columns: Iterator[torch.Tensor], gpt_device: torch.device,
                    decoder_threads: int | None) -> Iterator[StreamStep]:
    """The pixel steps of group k run while the GPT generates group k + 1 (step k needs groups ≤ k only).

    Finished groups are yielded in order as soon as their decoder job is done, checked between GPT
    tokens; the GPT waits while the consumer holds a yielded record, as in the sequential path.
    """
    device = decoder.tokenizer.device
    # Events order the two streams of one device; other placements (e.g. the GPT on another GPU) use a thread.
    lane = (_CudaLane(device, decoder) if device.type == "cuda" and device == gpt_device
            else _ThreadLane(device, decoder_threads))
    pending: deque[_Job] = deque()
    received: list[torch.Tensor] = []
    try:
        for column in columns:
            received.append(column)
            if len(received) % decoder.per_group == 0:
                pending.append(lane.submit(decoder, torch.stack(received, dim=1)))
            while pending and pending[0].ready():
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        lane.close()


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
