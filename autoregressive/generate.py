"""Sampling codes from the GPT with its static KV cache.

The method is docs/method.md §2 "Sampling"; the official conventions followed are docs/checkpoint_format.md §4.5.

Small pure functions in the gpt-fast style: :func:`prefill` (class token and forced prefix),
:func:`decode_one_token` (the hot step, optionally compiled), :func:`iter_decode` /
:func:`decode_n_tokens` (the loop), and :func:`iter_codes` / :func:`generate_codes` (the whole
thing, streamed position by position or collected). Randomness enters only through a (B, N) tensor of uniforms,
one per sample and position, drawn up front by :func:`draw_uniforms`; each token is chosen by inverse
CDF. A sample therefore depends only on its own uniforms and label, never on the batch it shares,
and the loop needs no host-device synchronisation.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

# Lowest temperature: the official sampler divides by max(temperature, 1e-5), so 0 means greedy.
MIN_TEMPERATURE = 1e-5
# The official sampler raises a schedule start of exactly 1.0 to this so that guidance is on from
# the first token (docs/checkpoint_format.md §4.5); D-AR's published numbers were made with it.
OFFICIAL_START_BUMP = 1.001


class CachedDecoder(Protocol):
    """What sampling needs of a model: gpt-fast's cached-forward interface (``autoregressive.model.GPT``).

    Declared here so that this module imports no model: the model imports these functions for its
    ``generate`` method, as a Hugging Face model imports its generation mixin.
    """

    config: Any  # block_size, has_null_class, null_class
    training: bool

    def setup_caches(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None: ...

    def forward_cached(self, input_pos: torch.Tensor, codes: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, *, start: int | None = None) -> torch.Tensor: ...

    def check_labels(self, labels: torch.Tensor, allow_null: bool = True) -> None: ...

    def check_codes(self, codes: torch.Tensor, name: str = "codes") -> None: ...


@dataclass(frozen=True)
class GuidanceSchedule:
    """Classifier-free guidance scale per generated position: constant, or linear start → end.

    Token i of N uses linspace(start, end, N)[i]. With ``official_start_quirk`` (default) a linear
    schedule that starts at exactly 1.0 and rises starts at 1.001 instead, reproducing the official
    sampler. Guidance (batch doubling with the null class) is on whenever any scale differs from 1;
    the official sampler only looked at the first entry and silently ignored e.g. "0.5,3.0".
    """

    start: float = 1.0
    end: float | None = None
    official_start_quirk: bool = True

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"guidance scales must be finite, got start={self.start}, end={self.end}")

    @classmethod
    def from_value(
        cls, value: "float | tuple[float, float] | Sequence[float] | GuidanceSchedule"
    ) -> "GuidanceSchedule":
        """Accept a schedule, a number, or a (start, end) pair.

        A string ("1.2,8.0") is a TypeError: parsing text is the command line's job
        (``utils.cli.parse_guidance_scale``), and a string reaching a library call is an unparsed flag.
        """
        if isinstance(value, GuidanceSchedule):
            return value
        if isinstance(value, str):
            raise TypeError(f"cfg_scale={value!r}: a string is not a guidance scale; pass a float or a (start, end) "
                            "tuple, e.g. cfg_scale=(1.2, 8.0)")
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return cls(float(value))
        if (isinstance(value, (tuple, list)) and len(value) == 2
                and not any(isinstance(v, (str, bytes, bool)) for v in value)):
            return cls(float(value[0]), float(value[1]))
        raise TypeError(f"cfg_scale must be a float or a (start, end) tuple of floats (or a GuidanceSchedule), "
                        f"got {value!r}")

    @property
    def final(self) -> float:
        return self.start if self.end is None else self.end

    @property
    def enabled(self) -> bool:
        return self.start != 1.0 or self.final != 1.0

    def scales(self, num_tokens: int) -> torch.Tensor:
        """(N,) float32 scales on the CPU (computed there so every device uses the same values)."""
        start, end = self.start, self.final
        if self.official_start_quirk and start == 1.0 and end > 1.0:
            start = OFFICIAL_START_BUMP
        return torch.linspace(start, end, num_tokens, dtype=torch.float32)


def _is_default(value: Any, default: float) -> bool:
    if isinstance(value, (bool, str)):
        return False
    if isinstance(value, GuidanceSchedule):
        return value == GuidanceSchedule(default)
    return isinstance(value, numbers.Real) and value == default


@dataclass(frozen=True)
class SamplingOptions:
    """How codes are chosen: guidance schedule, temperature, top-k, top-p (paper defaults: all off).

    Built once where the settings come in (a CLI's flags, a training recipe) and handed to
    :meth:`GPT.generate`, :func:`~autoregressive.stream.stream`, :func:`generate_codes`, ... as
    ``options=``. ``guidance`` also takes a number or a (start, end) tuple; a bad value raises
    ValueError (TypeError for a wrong type) naming the field.
    """

    guidance: GuidanceSchedule = field(default_factory=GuidanceSchedule)
    temperature: float = 1.0  # 0 = greedy (the official sampler's max(T, 1e-5))
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        # object.__setattr__: the dataclass is frozen; normalising here keeps every consumer simple.
        if isinstance(self.guidance, str):
            raise TypeError(f"guidance must be a float, a (start, end) tuple or a GuidanceSchedule, got "
                            f"{self.guidance!r} (command-line text is parsed by utils.cli.parse_guidance_scale)")
        try:
            object.__setattr__(self, "guidance", GuidanceSchedule.from_value(self.guidance))
        except TypeError:
            raise TypeError(f"guidance must be a float, a (start, end) tuple or a GuidanceSchedule, "
                            f"got {self.guidance!r}") from None
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        if not self.temperature >= 0:  # also refuses nan
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        try:
            top_k = operator.index(self.top_k) if not isinstance(self.top_k, bool) else -1
        except TypeError:
            top_k = -1
        if top_k < 0:
            raise ValueError(f"top_k must be a non-negative int (0 = off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", top_k)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @classmethod
    def resolve(
        cls,
        options: "SamplingOptions | None",
        cfg_scale: "float | tuple[float, float] | GuidanceSchedule" = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        *,
        guidance_name: str = "cfg_scale",
    ) -> "SamplingOptions":
        """``options``, or the separate keywords of the public sampling calls gathered into one.

        Both at once would leave one of them silently ignored, so that is a TypeError (naming the
        guidance keyword as ``guidance_name``).
        """
        if options is None:
            return cls(GuidanceSchedule.from_value(cfg_scale), temperature, top_k, top_p)
        if not isinstance(options, SamplingOptions):
            raise TypeError(f"options must be a SamplingOptions, got {type(options).__name__}")
        given = [name for name, value, default in ((guidance_name, cfg_scale, 1.0), ("temperature", temperature, 1.0),
                                                   ("top_k", top_k, 0), ("top_p", top_p, 1.0))
                 if not _is_default(value, default)]
        if given:
            raise TypeError(f"pass options=SamplingOptions(...) or {', '.join(given)}, not both")
        return options


# ------------------------------------------------------------------------------------------------
# Token selection
# ------------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p on logits (B, V); removed entries become −inf. Returns a new tensor.

    Top-k keeps every logit ≥ the k-th largest (ties kept). Top-p keeps the sorted prefix whose
    cumulative probability stays ≤ p plus the first token crossing p, so the best token always stays.
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        logits = logits.masked_fill(_top_p_drop(logits, top_p), -math.inf)
    return logits


def _top_p_drop(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool: the entries top-p removes (see :func:`filter_logits`)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    # Shift right by one: the token that crosses p is kept, and position 0 can never be dropped.
    drop_sorted = torch.cat([torch.zeros_like(drop_sorted[..., :1]), drop_sorted[..., :-1]], dim=-1)
    return drop_sorted.scatter(-1, order, drop_sorted)


def sample_token(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Pick one token per row of logits (B, V) by inverse CDF at uniforms (B,) in [0, 1) → (B,) int64.

    The smallest index whose cumulative probability exceeds u·total is chosen; a zero-probability
    token can never be that index, so top-k=1 (or temperature→0) gives the argmax.
    """
    logits = filter_logits(logits.float() / max(temperature, MIN_TEMPERATURE), top_k, top_p)
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    # Keep the target strictly below the total so rounding of u·total can never run off the end.
    target = torch.minimum(uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def apply_guidance(logits: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Logits (2B, V) of [conditional; null-class] rows → u + s·(c − u), shape (B, V)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * scale


def select_token(logits: torch.Tensor, uniforms: torch.Tensor, scale: torch.Tensor | float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 guided: bool = False) -> torch.Tensor:
    """``sample_token(apply_guidance(logits, scale) if guided else logits, ...)`` with equal results, fused.

    logits (B', V) (B' = 2B when guided), uniforms (B,) → (B,) int64. Guidance, temperature and the
    top-k/top-p masks are applied in place on one (B, V) working buffer, and the CDF is accumulated
    in place in the softmax's output: four (B, V) temporaries fewer per token than the separate
    functions. Every arithmetic step is the one of the separate functions, in the same order
    (x/1 and x + 0 are exact), so the chosen tokens are identical. ``logits`` is not modified.
    """
    if guided:
        cond, uncond = logits.float().chunk(2, dim=0)
        work = torch.sub(cond, uncond).mul_(scale).add_(uncond)  # u + (c − u)·s, as apply_guidance
        if temperature != 1.0:
            work.div_(max(temperature, MIN_TEMPERATURE))
    else:
        work = logits.float() / max(temperature, MIN_TEMPERATURE)  # a copy: the caller's logits stay intact
    if top_k > 0:
        kth = torch.topk(work, min(top_k, work.shape[-1]), dim=-1).values[..., -1:]
        work.masked_fill_(work < kth, -math.inf)
    if top_p < 1.0:
        work.masked_fill_(_top_p_drop(work, top_p), -math.inf)
    cdf = work.softmax(dim=-1).cumsum_(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def draw_uniforms(
    batch: int,
    num_tokens: int,
    *,
    seeds: torch.Tensor | Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, N) uniforms in [0, 1): one per sample and position.

    ``seeds``: sample b uses a CPU generator seeded with seeds[b], so its codes depend only on that
    seed (and its label) on any device, batch size, batch position or number of ranks.
    ``generators``: one generator per sample, same guarantee. ``generator``: a single generator
    fills the whole (B, N) block row by row. None of them: the global RNG of ``device``.
    """
    given = sum(x is not None for x in (seeds, generators, generator))
    if given > 1:
        raise ValueError("pass at most one of seeds, generators, generator")
    if seeds is not None:
        seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if len(seed_list) != batch:
            raise ValueError(f"got {len(seed_list)} seeds for a batch of {batch}")
        rows = [torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(s))) for s in seed_list]
        return torch.stack(rows).to(device) if rows else torch.empty(0, num_tokens, device=device)
    if generators is not None:
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
        rows = [torch.rand(num_tokens, generator=g, device=g.device).to(device) for g in generators]
        return torch.stack(rows) if rows else torch.empty(0, num_tokens, device=device)
    if generator is not None:
        return torch.rand(batch, num_tokens, generator=generator, device=generator.device).to(device)
    return torch.rand(batch, num_tokens, device=device)


# ------------------------------------------------------------------------------------------------
# Cached decoding
# ------------------------------------------------------------------------------------------------
def prefill(model: CachedDecoder, labels: torch.Tensor, prefix_codes: torch.Tensor | None = None) -> torch.Tensor:
    """Feed the class token (position 0) and forced codes (positions 1..k) → last logits (B, V)."""
    k = 0 if prefix_codes is None else prefix_codes.shape[1]
    input_pos = torch.arange(k + 1, device=labels.device)
    return model.forward_cached(input_pos, codes=prefix_codes if k else None, labels=labels)[:, -1]


def guided_logits(model: CachedDecoder, tokens: torch.Tensor, input_pos: torch.Tensor, scale: torch.Tensor,
                  guided: bool, start: int | None = None) -> torch.Tensor:
    """The model half of a decode step: feed tokens (B', 1) at input_pos (1,) → logits (B, V), guided.

    ``start`` (input_pos as a Python int) lets the eager model attend to the filled cache only.
    """
    logits = model.forward_cached(input_pos, codes=tokens, start=start)[:, -1]  # (B', V)
    return apply_guidance(logits, scale) if guided else logits


def decode_one_token(model: CachedDecoder, tokens: torch.Tensor, input_pos: torch.Tensor, scale: torch.Tensor,
                     uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     guided: bool, start: int | None = None) -> torch.Tensor:
    """Feed tokens (B', 1) at input_pos (1,) and pick the next token (B,); B' = 2B when guided.

    ``start``: input_pos[0] as a Python int, which :func:`iter_decode` passes to eager steps so the
    model attends to the filled part of its cache only (same logits). The sampler is the fused
    :func:`select_token`; :func:`reference_decode_one_token` is the unfused step kept as a baseline.
    """
    logits = model.forward_cached(input_pos, codes=tokens, start=start)[:, -1]  # (B', V)
    return select_token(logits, uniforms, scale, temperature, top_k, top_p, guided)


def reference_decode_one_token(model: CachedDecoder, tokens: torch.Tensor, input_pos: torch.Tensor,
                               scale: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int,
                               top_p: float, guided: bool) -> torch.Tensor:
    """The decode step before the fast paths: the whole cache under the causal mask, then
    :func:`apply_guidance` and :func:`sample_token` as separate passes. Same tokens as
    :func:`decode_one_token`; benchmarks and tests measure and check the fast step against it."""
    return sample_token(guided_logits(model, tokens, input_pos, scale, guided), uniforms, temperature, top_k, top_p)


# Eager steps that take the Python position. A set, not a function attribute: torch.compile's wrapper
# copies a function's attributes, and a compiled step given a new int every token would recompile.
POSITION_STEPS: set[Callable[..., torch.Tensor]] = {decode_one_token}

DecodeStep = Callable[..., torch.Tensor]


def iter_decode(model: CachedDecoder, first: torch.Tensor, start_pos: int, scales: torch.Tensor,
                uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float, guided: bool,
                step: DecodeStep = decode_one_token) -> Iterator[torch.Tensor]:
    """From token first (B,) at position start_pos, yield uniforms.shape[1] more tokens (B,) one by one.

    scales (n,) and uniforms (B, n) belong to the tokens being produced. The positions are counted
    on the host, so the loop never waits for the device; the eager steps in ``POSITION_STEPS`` get them.
    """
    batch = first.shape[0]
    takes_start = step in POSITION_STEPS
    # One buffer for the fed tokens and for the positions, written in place each step (the guided
    # [cond; null] rows share the token: the two halves are filled from the same values).
    fed = first.new_empty(2 * batch if guided else batch, 1)
    fed[:batch, 0] = first
    if guided:
        fed[batch:, 0] = first
    input_pos = torch.tensor([start_pos], device=first.device)
    for i in range(uniforms.shape[1]):
        extra = {"start": start_pos + i} if takes_start else {}
        # clone: a CUDA-graph step reuses its output buffer on the next call.
        nxt = step(model, fed, input_pos, scales[i], uniforms[:, i], temperature, top_k, top_p, guided,
                   **extra).clone()
        yield nxt
        fed[:batch, 0] = nxt
        if guided:
            fed[batch:, 0] = nxt
        input_pos.add_(1)


def decode_n_tokens(model: CachedDecoder, first: torch.Tensor, start_pos: int, scales: torch.Tensor,
                    uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float, guided: bool,
                    step: DecodeStep = decode_one_token) -> torch.Tensor:
    """:func:`iter_decode` collected into (B, n)."""
    tokens = list(iter_decode(model, first, start_pos, scales, uniforms, temperature, top_k, top_p, guided, step))
    return torch.stack(tokens, dim=1) if tokens else first.new_empty(first.shape[0], 0)


_COMPILED_STEPS: dict[tuple[str, bool, str], DecodeStep] = {}


def compiled_decode_one_token(device_type: str, split: bool | None = None, backend: str = "inductor") -> DecodeStep:
    """A torch.compile'd decode step with :func:`decode_one_token`'s signature and results; cached.

    ``split`` (default: on CUDA) compiles only :func:`guided_logits` and runs :func:`sample_token`
    eagerly; otherwise the whole step is one graph. CUDA needs the split: Inductor's Triton backend
    (torch 2.11, H200) crashes generating the split-scan kernel of the sampler's cumsum over a
    16384-entry vocabulary ("TypeError: list indices must be integers or slices, not NoneType" in
    ``get_block_shape``), while the model half compiles and runs under CUDA graphs
    ("reduce-overhead"): measured there for GPT-B, batch 8, 256 tokens with guidance, 2.96 s eager
    → 0.49 s compiled. The eager sampler is a handful of small kernels per token. On CPU the
    whole step compiles. ``backend`` is torch.compile's (tests use "eager" for speed).
    """
    split = device_type == "cuda" if split is None else split
    key = (device_type, split, backend)
    if key not in _COMPILED_STEPS:
        mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
        if not split:
            _COMPILED_STEPS[key] = torch.compile(decode_one_token, mode=mode, fullgraph=True, backend=backend)
        else:
            logits_fn = torch.compile(guided_logits, mode=mode, fullgraph=True, backend=backend)

            def step(model: CachedDecoder, tokens: torch.Tensor, input_pos: torch.Tensor, scale: torch.Tensor,
                     uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     guided: bool) -> torch.Tensor:
                # clone: under CUDA graphs the next replay overwrites the graph's output buffer.
                logits = logits_fn(model, tokens, input_pos, scale, guided).clone()
                return sample_token(logits, uniforms, temperature, top_k, top_p)

            _COMPILED_STEPS[key] = step
    return _COMPILED_STEPS[key]


def _expand_prefix(prefix_codes: torch.Tensor | None, batch: int, num_tokens: int,
                   device: torch.device) -> torch.Tensor | None:
    """Prefix (k,) or (B, k) → (B, k) int64 on device, or None when empty."""
    if prefix_codes is None:
        return None
    prefix = prefix_codes.to(device=device, dtype=torch.long)
    if prefix.ndim == 1:
        prefix = prefix[None].expand(batch, -1)
    if prefix.ndim != 2 or prefix.shape[0] != batch:
        raise ValueError(f"prefix_codes must be (k,) or (B={batch}, k), got {tuple(prefix_codes.shape)}")
    if prefix.shape[1] > num_tokens:
        raise ValueError(f"prefix of {prefix.shape[1]} codes is longer than the {num_tokens} to generate")
    return prefix if prefix.shape[1] > 0 else None


def iter_codes(
    model: CachedDecoder,
    labels: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    guidance: GuidanceSchedule = GuidanceSchedule(),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prefix_codes: torch.Tensor | None = None,
    compile: bool = False,
    options: SamplingOptions | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the N codes of each sample position by position, each as (B,) int64; see :func:`generate_codes`.

    Streaming consumers (previews after each group of codes) iterate this; nothing in the loop waits
    for the device unless the consumer reads the values. Arguments are checked before the first
    code is produced; the decoding itself runs under no_grad.
    """
    if model.training:
        raise RuntimeError("generate needs model.eval(): dropout would corrupt the samples")
    options = SamplingOptions.resolve(options, guidance, temperature, top_k, top_p, guidance_name="guidance")
    model.check_labels(labels)
    batch, num_tokens = labels.shape[0], uniforms.shape[1]
    if uniforms.shape[0] != batch:
        raise ValueError(f"uniforms {tuple(uniforms.shape)} do not match a batch of {batch}")
    if not 1 <= num_tokens <= model.config.block_size:
        raise ValueError(f"can generate 1..{model.config.block_size} codes, asked for {num_tokens}")
    prefix = _expand_prefix(prefix_codes, batch, num_tokens, labels.device)
    if prefix is not None:
        model.check_codes(prefix, "prefix_codes")
    if options.guidance.enabled and not model.config.has_null_class:
        raise ValueError("classifier-free guidance needs a null class (class_dropout_prob > 0 in the config)")
    step = compiled_decode_one_token(labels.device.type) if compile else decode_one_token
    return _decode_stream(model, labels, uniforms.to(labels.device), options, prefix, step)


@torch.no_grad()
def _decode_stream(model: CachedDecoder, labels: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions,
                   prefix: torch.Tensor | None, step: DecodeStep) -> Iterator[torch.Tensor]:
    """The body of :func:`iter_codes` on validated inputs (prefix (B, k) or None)."""
    guidance, temperature, top_k, top_p = options.guidance, options.temperature, options.top_k, options.top_p
    num_tokens = uniforms.shape[1]
    k = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        yield from prefix.unbind(dim=1)
    if k == num_tokens:
        return
    guided = guidance.enabled
    labels_in, prefix_in = labels, prefix
    if guided:
        labels_in = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
        prefix_in = None if prefix is None else torch.cat([prefix, prefix])
    scales = guidance.scales(num_tokens).to(labels.device)

    # The last code is never fed back, so positions 0..N-1 (class + N-1 codes) fill the cache.
    model.setup_caches(labels_in.shape[0], num_tokens, device=labels.device)
    logits = prefill(model, labels_in, prefix_in)  # (B', V)
    first = select_token(logits, uniforms[:, k], scales[k], temperature, top_k, top_p, guided)  # (B,)
    yield first
    yield from iter_decode(model, first, k + 1, scales[k + 1:], uniforms[:, k + 1:], temperature, top_k, top_p,
                           guided, step=step)


def generate_codes(
    model: CachedDecoder,
    labels: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    guidance: GuidanceSchedule = GuidanceSchedule(),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prefix_codes: torch.Tensor | None = None,
    compile: bool = False,
    options: SamplingOptions | None = None,
) -> torch.Tensor:
    """Sample codes (B, N) for labels (B,) with uniforms (B, N) (see :func:`draw_uniforms`).

    Token i uses guidance scale ``guidance.scales(N)[i]`` and uniforms[:, i]. Guided batches hold
    [labels; null class] rows that share the chosen token. The first k codes are ``prefix_codes``
    ((k,) or (B, k)), returned verbatim and fed through the cache; their uniforms go unused, so a
    prefixed run draws the same randomness for the remaining positions as an unprefixed one.
    ``options`` may replace ``guidance``, ``temperature``, ``top_k`` and ``top_p`` (not both).
    """
    columns = iter_codes(model, labels, uniforms, guidance=guidance, temperature=temperature, top_k=top_k,
                         top_p=top_p, prefix_codes=prefix_codes, compile=compile, options=options)
    return torch.stack(list(columns), dim=1)
