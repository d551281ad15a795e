"""The sequential diffusion tokenizer: image ↔ 1-D code sequence (docs/method.md §1, docs/checkpoint_format.md §3).

Parameter names equal the official ones (``encoder_layers.*``, ``quantize.embedding.weight``,
``diff_decoder.net.*``, ...), so official state dicts load after a filter (see
:func:`tokenizer.loading.convert_official_state_dict`); :func:`build_from_state_dict` builds a model from them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer import flow, inference
from tokenizer.config import TokenizerConfig, from_official
from tokenizer.loading import (REPA_PREFIX, USAGE_KEY, convert_official_state_dict, read_tokenizer_checkpoint,
                               write_tokenizer_files)
from tokenizer.modules import GatedBlock, RopeTable
from tokenizer.pixel_decoder import PixelDecoder, build_repa_head
from utils.checkpoint import StateDictMismatchError, check_state_dict, names_list


class Quantizer(nn.Module):
    """L2-normalised VQ with a straight-through estimator (lowest index wins ties)."""

    def __init__(self, codebook_size: int, dim: int, beta: float, usage_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # Unit rows from the start, as the official quantizer does. Rows are normalised on use anyway,
        # but the stored norm sets the gradient scale: rows of norm ~1/K would get ~K× larger gradients
        # than the rest of the model, dominate the clipped global norm and spin under Adam.
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.beta = beta
        # Rolling window of recently used code indices (a training statistic the official checkpoints
        # carry); kept so state dicts round-trip key for key. Inference never reads it.
        self.register_buffer("codebook_used", torch.zeros(usage_size))

    def codebook(self) -> Tensor:
        """(K, d) unit-norm codebook rows; stored rows are not normalised, so normalise on use."""
        return F.normalize(self.embedding.weight, dim=-1)

    @staticmethod
    def distances(z: Tensor, codebook: Tensor) -> Tensor:
        """z (..., d), codebook (K, d) → squared distances (M, K), M = z.numel() / d."""
        flat = z.reshape(-1, z.shape[-1])
        # Written out as in the reference so ties and near-ties resolve identically.
        return flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (B, n) → unit-norm code vectors (B, n, d)."""
        return F.embedding(codes, self.codebook())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, n, d) raw projections → (codes (B, n), normalised z (B, n, d), code vectors z_q (B, n, d)).

        z_q carries gradients to the codebook only; use :meth:`straight_through` to feed the decoder.
        """
        z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        codes = self.distances(z, codebook).argmin(dim=1).view(z.shape[:-1])
        z_q = F.embedding(codes, codebook)
        return codes, z, z_q

    @staticmethod
    def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
        """Forward value z_q, gradient of the identity to z (VQ-VAE straight-through estimator)."""
        return z + (z_q - z).detach()

    def entropy_loss(self, z: Tensor, temperature: float) -> Tensor:
        """Per-token assignment entropy minus the entropy of the batch's average assignment.

        The codebook-usage regulariser of MaskGIT / MAGVIT-style tokenizers (LlamaGen's VQ option
        ``entropy_loss_ratio``), with soft assignments p(k | z) = softmax(−‖z − c_k‖² / temperature).
        Lowering it makes each token commit to one code while the batch spreads over many codes,
        which counters codebook collapse in short runs. z (..., d) normalised latents; float32.
        """
        if temperature <= 0:
            raise ValueError(f"entropy temperature must be positive, got {temperature}")
        dist = self.distances(z.float(), self.codebook().float())
        log_probs = F.log_softmax(-dist / temperature, dim=-1)
        probs = log_probs.exp()
        per_token = -(probs * log_probs).sum(-1).mean()
        average = probs.mean(0)
        batch = -(average * average.clamp_min(1e-12).log()).sum()
        return per_token - batch

    def losses(self, z: Tensor, z_q: Tensor, prefix_len: Tensor) -> dict[str, Tensor]:
        """Codebook and β·commitment MSE averaged over tokens n < prefix_len[b] of every image b (pooled).

        Tokens after the trained group cannot influence this training step's flow loss, so pulling
        them towards the codebook would only add noise (docs/method.md §1 "Quantizer").
        """
        positions = torch.arange(z.shape[1], device=z.device)
        mask = (positions[None] < prefix_len[:, None]).to(z.dtype)  # (B, n)
        count = mask.sum()
        codebook = (z_q - z.detach()).pow(2).mean(-1)
        commitment = (z_q.detach() - z).pow(2).mean(-1)
        return {
            "codebook": (codebook * mask).sum() / count,
            "commitment": self.beta * (commitment * mask).sum() / count,
        }


@dataclass
class TokenizerTrainOutput:
    """What one training forward hands the trainer (all tensors keep their graph).

    Shapes: B images of C×H×W, N tokens, g = repa_pool_grid.
    """

    codes: Tensor  # (B, N) int64
    losses: dict[str, Tensor]  # {"flow", "codebook", "commitment"}; commitment already includes β
    velocity: Tensor  # (B, C, H, W) predicted velocity, data_std-scaled space
    target: Tensor  # (B, C, H, W) target velocity x1 − x0
    x_t: Tensor  # (B, C, H, W) noisy input of the network, data_std-scaled space
    t: Tensor  # (B,) warped time sigma(u) given to the network
    u: Tensor  # (B,) unwarped time that picked the condition window
    window_start: Tensor  # (B,) first condition token of each image's window
    prefix_len: Tensor  # (B,) tokens covered by the VQ losses (= the window end)
    clean_image: Tensor  # (B, C, H, W) (x_t + (1 − t)·v) / data_std, image space (for LPIPS / GAN)
    repa: Tensor | None  # (B, g², repa_out_dim) REPA head output; None when depth <= repa_layer


DECODE_DTYPES: tuple[torch.dtype | None, ...] = (None, torch.float32, torch.bfloat16, torch.float16)


def _pixel_precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast for a reduced-precision decode; float32 (None) leaves any caller's autocast alone."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.compiler.disable  # B small draws from B generators: nothing for the compiler, and no guards on them
def _per_sample_draws(images: Tensor, generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """(u (B,), x0 like ``images``): image b's time then noise, both from ``generators[b]`` only."""
    if len(generators) != images.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {images.shape[0]} images")
    u = torch.empty(images.shape[0], device=images.device)
    x0 = torch.empty_like(images)
    for b, generator in enumerate(generators):
        u[b : b + 1].uniform_(generator=generator)
        x0[b].normal_(generator=generator)
    return u, x0


class DARTokenizer(nn.Module):
    """Encoder → VQ → causal code decoder → sequential flow-matching pixel decoder."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        block = lambda dim: GatedBlock(dim, c.head_dim, c.mlp_ratio, c.norm_eps, c.grad_checkpointing)  # noqa: E731
        self.patchify = nn.Conv2d(c.diff_decoder.channels, c.encoder_dim, c.encoder_patch_size, c.encoder_patch_size)
        self.encoder_layers = nn.ModuleList(block(c.encoder_dim) for _ in range(c.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(block(c.decoder_dim) for _ in range(c.num_decoder_layers))
        self.quant_in_conv = nn.Conv2d(c.encoder_dim, c.vq_dim, 1, bias=False)
        self.quant_out_conv = nn.Conv2d(c.vq_dim, c.decoder_dim, 1, bias=False)
        self.quantize = Quantizer(c.vq_codebook_size, c.vq_dim, c.commitment_beta, c.codebook_used_size)
        if c.query_low_rank:
            self.query_embedding = nn.Embedding(c.max_queries, c.query_rank)
            self.query_linear = nn.Linear(c.query_rank, c.encoder_dim)
            nn.init.trunc_normal_(self.query_embedding.weight, std=1.0)
        else:
            self.query_embedding = nn.Embedding(c.max_queries, c.encoder_dim)
            self.query_linear = nn.Identity()
            nn.init.trunc_normal_(self.query_embedding.weight, std=0.02)
        self.decoder_embedding = nn.Embedding(c.max_queries, c.decoder_dim)
        nn.init.trunc_normal_(self.decoder_embedding.weight, std=0.02)
        self.diff_decoder = nn.ModuleDict({"net": PixelDecoder(c.diff_decoder)})
        self.rope = RopeTable(c.rope_base_len, c.rope_axes_dim)
        self.schedule = flow.GroupSchedule(
            c.num_denoising_steps, c.num_query_groups, c.num_all_queries, c.queries_per_step, c.diff_decoder.time_shift
        )
        self._masks: dict[tuple[int, int, torch.device], Tensor] = {}

    @property
    def pixel_decoder(self) -> PixelDecoder:
        return self.diff_decoder["net"]

    @property
    def device(self) -> torch.device:
        return self.decoder_embedding.weight.device

    # ------------------------------------------------------------------ encoder
    def _encoder_mask(self, num_patches: int, device: torch.device) -> Tensor:
        """(P+N, P+N) bool: patches see patches only; query j sees all patches and queries ≤ j."""
        key = (num_patches, self.config.num_all_queries, device)
        if key not in self._masks:
            length = num_patches + self.config.num_all_queries
            mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            mask[:, :num_patches] = True
            self._masks[key] = mask
        return self._masks[key]

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless images are (B, C, H, W) with H and W multiples of the encoder patch size."""
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.diff_decoder.channels:
            raise ValueError(f"expected images (B, {c.diff_decoder.channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % c.encoder_patch_size or images.shape[-1] % c.encoder_patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {c.encoder_patch_size}")

    def encode_latents(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [-1, 1] → pre-quantisation projections (B, N, vq_dim).

        The module-by-module reference (and the training path); :meth:`encode` uses the equal, faster
        :func:`tokenizer.inference.encode_latents`.
        """
        c = self.config
        self.check_images(images)
        grid = self.patchify(images)
        height, width = grid.shape[-2:]
        patches = F.layer_norm(rearrange(grid, "b d h w -> b (h w) d"), (c.encoder_dim,), eps=c.norm_eps)
        queries = self.query_linear(self.query_embedding.weight[: c.num_all_queries])  # (N, D), same for every image
        tokens = torch.cat([patches, queries.expand(images.shape[0], -1, -1)], dim=1)  # (B, P+N, D)
        rope = self.rope(height, width, images.device, extra=c.num_all_queries)
        mask = self._encoder_mask(patches.shape[1], images.device)
        for layer in self.encoder_layers:
            tokens = layer(tokens, rope=rope, attn_mask=mask)
        tokens = F.layer_norm(tokens[:, -c.num_all_queries :], (c.encoder_dim,), eps=c.norm_eps)
        return F.linear(tokens, self.quant_in_conv.weight.flatten(1))

    @torch.no_grad()
    def encode(self, images: Tensor, reference: bool = False) -> Tensor:
        """images (B, C, H, W) in [-1, 1] → codes (B, N) int64, in query (= diffusion) order.

        ``reference=True`` runs the module-by-module path (same codes, slower; for tests and benchmarks).
        """
        if reference:
            codes, _, _ = self.quantize(self.encode_latents(images))
            return codes
        return inference.quantize_codes(self.quantize.codebook(), inference.encode_latents(self, images))

    # ------------------------------------------------------------------ code decoder
    def cond_from_quantized(self, z_q: Tensor) -> Tensor:
        """Unit-norm code vectors (B, n, vq_dim), n ≤ N → condition tokens (B, n, decoder_dim).

        Causal: cond[:, :k] depends on z_q[:, :k] only, which is what makes prefixes decodable.
        """
        n = z_q.shape[1]
        if n > self.config.num_all_queries:
            raise ValueError(f"got {n} codes, the tokenizer uses {self.config.num_all_queries}")
        tokens = F.linear(z_q, self.quant_out_conv.weight.flatten(1)) + self.decoder_embedding.weight[:n]
        for layer in self.decoder_layers:
            tokens = layer(tokens, causal=True)
        return F.layer_norm(tokens, (self.config.decoder_dim,), eps=self.config.norm_eps)

    def cond_from_codes(self, codes: Tensor) -> Tensor:
        """codes (B, n) → condition tokens (B, n, decoder_dim)."""
        if codes.dim() != 2 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an integer tensor (B, n), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.vq_codebook_size):
            raise ValueError(f"codes must lie in 0..{self.config.vq_codebook_size - 1}")
        return self.cond_from_quantized(self.quantize.lookup(codes.to(self.device, torch.long)))

    # ------------------------------------------------------------------ pixel decoder
    def velocity(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """One pixel-decoder evaluation: x (B, C, H, W) data_std space, t (B,) warped, cond (B, Q, D)."""
        return self.pixel_decoder(x, t, cond)

    def to_image(self, x: Tensor) -> Tensor:
        """Sampler state (data_std space) → image space, plus the optional official output resize."""
        # Multiplying by the reciprocal (not dividing) matches the reference to the last bit.
        image = x * (1.0 / self.config.diff_decoder.data_std)
        size = self.config.output_resolution
        if size and (image.shape[-2] > size or image.shape[-1] > size):
            image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
        return image

    def make_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Start state (B, C, R, R), R = sampling_resolution, drawn on the generator's device (CPU default)."""
        res = self.config.sampling_resolution
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(batch_size, self.config.diff_decoder.channels, res, res, generator=generator, device=device)
        return noise.to(self.device)

    def start_sampler(
        self,
        batch_size: int,
        noise: Tensor | None = None,
        steps: int | None = None,
        sampler: flow.SamplerName = "adams2",
        generator: torch.Generator | None = None,
    ) -> flow.SequentialSampler:
        """A :class:`flow.SequentialSampler` over ``steps`` (default all) steps from ``noise`` or a fresh draw."""
        if noise is None:
            noise = self.make_noise(batch_size, generator)
        elif noise.dim() != 4 or noise.shape[0] != batch_size or noise.shape[1] != self.config.diff_decoder.channels:
            raise ValueError(
                f"noise must be ({batch_size}, {self.config.diff_decoder.channels}, H, W), got {tuple(noise.shape)}"
            )
        return flow.SequentialSampler(noise.to(self.device), self.schedule.sigmas(steps), sampler)

    @torch.no_grad()
    def sampler_step(
        self, state: flow.SequentialSampler, cond: Tensor, preview: bool = True, reference: bool = False
    ) -> Tensor | None:
        """Run the next step of ``state`` on condition tokens ``cond`` (B, n, D), n ≥ that step's window end.

        Returns the preview in image space (None with ``preview=False``); the state advances in place.
        This is the streaming primitive: cond may be a prefix that grows between calls. It computes
        exactly what one step of :meth:`decode` computes (``reference`` as there).
        """
        session = None if reference else inference.PixelDecoderSession(self.pixel_decoder, cond)
        return self._step(state, cond, session, preview)

    def _step(
        self, state: flow.SequentialSampler, cond: Tensor, session: inference.PixelDecoderSession | None,
        preview: bool,
    ) -> Tensor | None:
        begin, end = self.schedule.window(state.step_index)
        if cond.shape[1] < end:
            raise ValueError(f"step {state.step_index} needs condition tokens [{begin}, {end}), got {cond.shape[1]}")
        if session is None:
            window = cond[:, begin:end]
            velocity = lambda x, t: self.velocity(x, t, window)  # noqa: E731
        else:
            velocity = lambda x, t: session.velocity(x, t, begin, end)  # noqa: E731
        _, jump = state.step(velocity, preview=preview)
        return None if jump is None else self.to_image(jump)

    def _run(
        self, codes: Tensor, noise: Tensor | None, steps: int, sampler: flow.SamplerName,
        generator: torch.Generator | None, keep_previews: bool, reference: bool, dtype: torch.dtype | None,
    ) -> list[Tensor]:
        if not 1 <= steps <= self.config.num_denoising_steps:
            raise ValueError(f"steps must be in 1..{self.config.num_denoising_steps}, got {steps}")
        if dtype not in DECODE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, DECODE_DTYPES))}, got {dtype}")
        needed = self.schedule.tokens_needed(steps)
        if codes.shape[-1] < needed:
            raise ValueError(f"{steps} decoding step(s) need the first {needed} codes, got {codes.shape[-1]}")
        cond = self.cond_from_codes(codes[:, :needed])
        state = self.start_sampler(codes.shape[0], noise, steps, sampler, generator)
        session = None if reference else inference.PixelDecoderSession(self.pixel_decoder, cond)
        previews = []
        with _pixel_precision(self.device, dtype):
            while not state.done:
                last = state.step_index == state.num_steps - 1
                preview = self._step(state, cond, session, preview=keep_previews or last)
                if preview is not None:
                    previews.append(preview.float())
        return previews

    @torch.no_grad()
    def decode(
        self,
        codes: Tensor,
        noise: Tensor | None = None,
        steps: int | None = None,
        sampler: str = "adams2",
        generator: torch.Generator | None = None,
        reference: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """codes (B, n) → images (B, C, H, W) float32 (unclamped, ~[-1, 1]).

        ``steps=k`` returns the preview after k groups (the k-th step jumps to t = 1); it needs only
        the codes its windows read, so a code prefix is accepted. ``noise`` (B, C, H, W) sets the
        output size; ``None`` draws (B, C, R, R), R = sampling_resolution, from ``generator``.
        ``dtype=torch.bfloat16`` (or float16) runs the pixel decoder under autocast in that dtype (the
        sampler state stays float32); None / float32 is exact float32. ``reference=True`` runs the
        module-by-module path that the default fast path reproduces bit for bit in float32
        (:mod:`tokenizer.inference`); it is slower and kept for tests and benchmarks.
        """
        steps = self.config.num_denoising_steps if steps is None else steps
        return self._run(codes, noise, steps, sampler, generator, False, reference, dtype)[-1]

    @torch.no_grad()
    def previews(
        self,
        codes: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "adams2",
        steps: int | None = None,
        reference: bool = False,
        dtype: torch.dtype | None = None,
    ) -> list[Tensor]:
        """The preview after each step of one sampling pass; the last equals :meth:`decode` with the same
        ``noise``, ``sampler``, ``steps`` (default all S), ``reference`` and ``dtype``."""
        steps = self.config.num_denoising_steps if steps is None else steps
        return self._run(codes, noise, steps, sampler, generator, True, reference, dtype)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        entropy_temperature: float | None = None,
        time_sampling: flow.TimeSampling = "uniform",
    ) -> TokenizerTrainOutput:
        """One training step's forward: encode, quantise (STE), decode conditions, one flow-matching draw.

        u ~ U(0, 1) per image picks the condition window by the group rounding rule and, warped, the flow
        time; x0 ~ N(0, I). With ``time_sampling="group_balanced"`` u is remapped so that every condition
        window gets the same share of draws (:meth:`flow.GroupSchedule.group_balanced_times`); uniform times
        are the paper's objective. Random draws use ``generator`` (on the images' device) or the global RNG;
        a sequence of B generators (the trainer's, seeded per sample) draws image b's u and x0 from the b-th
        alone, so a sample's draws do not depend on the batch it lands in.
        The flow loss and the prefix-masked VQ losses are returned as named terms, plus "entropy"
        (:meth:`Quantizer.entropy_loss` over all N tokens) when ``entropy_temperature`` is given.
        """
        if time_sampling not in flow.TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {flow.TIME_SAMPLINGS}")
        c = self.config
        if generator is None or isinstance(generator, torch.Generator):
            u = torch.rand(images.shape[0], generator=generator, device=images.device)
            x0 = None
        else:
            u, x0 = _per_sample_draws(images, generator)
        if time_sampling == "group_balanced":
            u = self.schedule.group_balanced_times(u)
        starts = self.schedule.training_window_starts(u)  # (B,)
        prefix_len = starts + c.queries_per_step
        codes, z, z_q = self.quantize(self.encode_latents(images))
        losses = self.quantize.losses(z, z_q, prefix_len)
        if entropy_temperature is not None:
            losses["entropy"] = self.quantize.entropy_loss(z, entropy_temperature)
        # (B, N, D); gradients reach the encoder through the straight-through estimator.
        cond = self.cond_from_quantized(self.quantize.straight_through(z, z_q))
        index = starts[:, None] + torch.arange(c.queries_per_step, device=images.device)  # (B, Q)
        window = torch.gather(cond, 1, index[..., None].expand(-1, -1, cond.shape[-1]))  # (B, Q, D)
        t = flow.warp_time(u, c.diff_decoder.time_shift)
        x1 = images * c.diff_decoder.data_std
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, device=images.device, dtype=images.dtype)
        x_t = flow.interpolate(x0, x1, t)
        target = flow.target_velocity(x0, x1)
        if c.diff_decoder.has_repa_head:
            velocity, repa = self.pixel_decoder(x_t, t, window, return_repa=True)
        else:
            velocity, repa = self.pixel_decoder(x_t, t, window), None
        losses.update(flow.flow_loss(velocity, target, c.diff_decoder.data_std))
        clean = flow.clean_estimate(x_t, velocity, t) / c.diff_decoder.data_std
        return TokenizerTrainOutput(
            codes=codes, losses=losses, velocity=velocity, target=target, x_t=x_t, t=t, u=u,
            window_start=starts, prefix_len=prefix_len, clean_image=clean, repa=repa,
        )

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = "showlab/D-AR",
        filename: str | None = None,
        config: TokenizerConfig | str | os.PathLike | None = None,
        device: str | torch.device | None = None,
    ) -> DARTokenizer:
        """Load an eval-mode tokenizer from a local file/folder or the hub (default ``showlab/D-AR``).

        - A folder written by :meth:`save_pretrained` (``model.safetensors`` + ``tokenizer_config.yaml``).
        - A ``.safetensors`` file (config from a sibling ``tokenizer_config.yaml``, else ``config``, else v1).
        - A ``.pt`` file: official layouts (``ema`` preferred over ``model`` over a bare state dict;
          the config comes from a ``tokenizer_config`` entry in our schema, else the official
          ``config`` entry's ``model`` section, else the v1 preset). Loaded with
          ``weights_only=True``; only the official config / args objects are allow-listed.
        - A hub repo id: ``filename`` in that repo (default ``D-AR-tokenizer_v1.pt``), through the
          ``huggingface_hub`` cache; offline without a cached copy raises ``WeightsNotFoundError``.
        - A training checkpoint of ``tokenizer.train``, also as ``RUN/checkpoints/latest`` (the newest one).

        A GPT checkpoint or a training run folder given here raises a ``UserError`` that says so.

        ``config`` (a :class:`TokenizerConfig`, preset name or YAML path) overrides any stored config.
        Loading is strict; see :func:`tokenizer.loading.convert_official_state_dict`.
        """
        state_dict, resolved = read_tokenizer_checkpoint(path_or_repo_id, filename, config=config)
        return build_from_state_dict(resolved, state_dict, device=device)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``tokenizer_config.yaml`` that :meth:`from_pretrained` reads back."""
        return write_tokenizer_files(self.state_dict(), self.config, directory)


def build_from_state_dict(
    config: TokenizerConfig, state_dict: dict[str, Any], device: str | torch.device | None = None
) -> DARTokenizer:
    """Build ``config`` without initialising it (meta device), then load ``state_dict`` strictly.

    Skipping the random init matters for the 307M-parameter v1 model. Optional entries that the
    checkpoint lacks are initialised normally (REPA head) or zeroed (usage statistic). Tensors are
    cast to float32 and moved to ``device`` (default: where they are).
    """
    with torch.device("meta"):
        model = DARTokenizer(config)
    converted, optional = convert_official_state_dict(state_dict, model)
    check_state_dict(converted, model.state_dict(), "tokenizer checkpoint", optional=optional)
    repa_expected = {k for k in optional if k.startswith(REPA_PREFIX)}
    repa_given = {k for k in converted if k.startswith(REPA_PREFIX)}
    if repa_given and repa_given != repa_expected:
        absent = names_list(sorted(repa_expected - repa_given))
        raise StateDictMismatchError(f"incomplete REPA head, missing keys: {absent}")
    target = torch.device(device) if device is not None else None
    tensors = {}
    for key, value in converted.items():
        if not value.is_floating_point():
            raise StateDictMismatchError(f"{key} has dtype {value.dtype}; the tokenizer stores float tensors")
        value = value.to(dtype=torch.float32, device=target or value.device)
        tensors[key] = value
    # Strictness was enforced by check_state_dict above; strict=False here only lets the two optional
    # entries (usage statistic, REPA head) be absent, and they are filled in just below.
    model.load_state_dict(tensors, strict=False, assign=True)
    device_of_rest = model.decoder_embedding.weight.device
    if USAGE_KEY not in converted:
        model.quantize.codebook_used = torch.zeros(model.quantize.codebook_used.shape, device=device_of_rest)
    if config.diff_decoder.has_repa_head and not any(k.startswith(REPA_PREFIX) for k in converted):
        with torch.device(device_of_rest):
            model.pixel_decoder.repa_out = build_repa_head(config.diff_decoder)
    uninitialised = [name for name, t in model.state_dict().items() if t.is_meta]
    if uninitialised and device_of_rest.type != "meta":  # a guard against silently unloaded weights
        raise StateDictMismatchError(f"entries left uninitialised: {names_list(uninitialised)}")
    return model.eval()


def load_tokenizer_from_official(state_dict: dict, model_config: dict) -> DARTokenizer:
    """Official state dict + official ``model:`` config mapping → eval-mode :class:`DARTokenizer` (strict)."""
    return build_from_state_dict(from_official(model_config), state_dict)
