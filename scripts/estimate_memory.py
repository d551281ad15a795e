"""Per-GPU memory of one training step of a recipe, without a GPU: does it fit?

    python -m scripts.estimate_memory --config configs/ar/gpt_xl.yaml --gpus 8 --gpu-memory 80
    python -m scripts.estimate_memory --config configs/tokenizer/train_v1.yaml --gpus 8 --gpu-memory 80

The real model of the recipe (``autoregressive.train`` or ``tokenizer.train``) is built under
``FakeTensorMode`` (no memory is allocated) and runs forward + backward of one micro-batch on fake CPU
tensors under bf16 autocast, counting the bytes of every storage created while it is alive
(:class:`LiveBytes`); their peak is the activation memory of that micro-batch. Weights, gradients,
AdamW's two fp32 states, the EMA copy and the frozen loss networks are counted from the parameter
numbers; data-parallel overheads (DDP's gradient buckets, FSDP's unsharded blocks) are arithmetic.
The verdict judges the recipe as shipped (its ``fsdp`` / ``grad_accum_steps`` /
``activation_checkpointing``) against the GPU memory less a margin (10 % + 1 GiB CUDA context) and,
when it does not fit, names the smallest change that does: more gradient accumulation, then
activation checkpointing, then FSDP; when it fits with activation checkpointing and would fit without,
it says so (the recomputation costs time). These are estimates: the CUDA caching allocator's fragmentation
is inside the margin, not modelled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from utils.config import load_yaml
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, call_cli, require_path

GIB = 2**30
MARGIN_FRACTION = 0.10  # allocator fragmentation, NCCL buffers, kernels' workspaces
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS/cuDNN handles, outside the caching allocator


@dataclass(frozen=True)
class Recipe:
    """What the estimate needs from a training recipe of either trainer."""

    kind: str  # "gpt" or "tokenizer"
    path: str
    global_batch_size: int
    grad_accum_steps: int
    fsdp: bool
    activation_checkpointing: bool
    ema: bool
    precision: str  # "bf16" or "fp32" as it runs on a GPU
    config: Any  # ARTrainConfig or TokenizerTrainConfig

    @property
    def fsdp_supported(self) -> bool:
        return self.kind == "gpt"


def load_recipe(path: str | Path) -> Recipe:
    """A recipe of ``autoregressive.train`` (``model:`` a GPT mapping) or of ``tokenizer.train``."""
    require_path(path, "--config")
    if not Path(path).is_file():
        raise UserError(f"--config {path} is a folder; pass a recipe YAML such as configs/ar/gpt_xl.yaml")
    try:
        data = load_yaml(path)
    except yaml.YAMLError as error:
        raise UserError(f"--config {path} is not valid YAML ({error}); pass a recipe YAML") from None
    if "model" not in data:
        raise UserError(f"--config {path} has no 'model' entry; pass a training recipe (configs/ar/*.yaml or "
                        "configs/tokenizer/train_*.yaml), not a model file")
    if _is_gpt_model_section(data["model"]):
        from autoregressive.train import load_ar_config

        cfg = load_ar_config(path)
        t = cfg.train
        return Recipe("gpt", str(path), t.global_batch_size, t.grad_accum_steps, t.fsdp, t.activation_checkpointing,
                      t.optim.ema_decay > 0, _gpu_precision(t.precision), cfg)
    from tokenizer.train import load_train_config, with_activation_checkpointing

    cfg = with_activation_checkpointing(load_train_config(path))
    t = cfg.train
    ac = cfg.model.grad_checkpointing or cfg.model.diff_decoder.grad_checkpointing
    return Recipe("tokenizer", str(path), t.global_batch_size, t.grad_accum_steps, False, ac,
                  t.optim.ema_decay > 0, _gpu_precision(t.precision), cfg)


def _is_gpt_model_section(model: Any) -> bool:
    """A GPT recipe's ``model:`` is a GPTConfig mapping; a tokenizer's is a preset, a file or a TokenizerConfig one."""
    from autoregressive.config import GPT_PRESETS, GPTConfig
    from tokenizer.config import TokenizerConfig

    if not isinstance(model, dict):
        return False
    keys = set(model) - {"preset"}
    gpt_only = {f.name for f in dataclasses.fields(GPTConfig)} - {f.name for f in dataclasses.fields(TokenizerConfig)}
    if keys & gpt_only:
        return True
    if keys:
        return False
    return model.get("preset") in GPT_PRESETS  # a bare preset: "tiny" exists for both, GPT recipes use this form


def _gpu_precision(precision: str) -> str:
    return "bf16" if precision == "auto" else precision  # utils.training.default_precision on CUDA


# ------------------------------------------------------------------------------------------------
# Measuring activations under FakeTensorMode
# ------------------------------------------------------------------------------------------------
class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in for the fused CUDA attention kernels (flash / memory-efficient) while measuring.

    Those keep only the output and a float32 log-sum-exp per query row for backward (O(L) per head);
    on the CPU, SDPA may pick the math path, which materialises the L×L score matrix and would
    overstate the memory of long sequences. Values are never read under FakeTensorMode, so only
    shapes and what is saved matter.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if torch.is_autocast_enabled("cpu"):
        # CUDA autocast runs SDPA in the low-precision dtype, so the kernel saves bf16 copies.
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dtype) for t in (q, k, v))
    return _FusedAttentionMemory.apply(q, k, v)


@contextlib.contextmanager
def fused_attention_accounting() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` (called through the module at call time) to the stand-in."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training micro-step measured on fake tensors."""

    trainable_params: int  # numel of parameters the optimizer updates
    frozen_params: int  # numel of frozen parameters (loss networks, frozen heads)
    buffer_bytes: int
    activation_bytes: int  # peak of everything but parameters, gradients and buffers during fwd + bwd
    block_params: int  # numel of the largest FSDP unit below the root (0 if no FSDP)
    root_params: int  # numel of the parameters outside FSDP's per-block units


StepFactory = Callable[[int], Callable[[], torch.Tensor]]  # micro-batch size -> one forward returning the loss


def _build_gpt_step(recipe: Recipe, ac: bool) -> tuple[list[nn.Module], StepFactory]:
    from autoregressive.model import GPT

    cfg = recipe.config.model
    model = GPT(cfg, activation_checkpointing=ac).train()
    # The range checks read values, which fake tensors do not have.
    model.check_codes = lambda *a, **k: None
    model.check_labels = lambda *a, **k: None

    def make_step(batch: int) -> Callable[[], torch.Tensor]:
        codes = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
        labels = torch.randint(0, cfg.num_classes, (batch,))

        def step() -> torch.Tensor:
            logits = model(codes, labels)
            return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())

        return step

    return [model], make_step


def _build_tokenizer_step(recipe: Recipe, ac: bool) -> tuple[list[nn.Module], StepFactory]:
    from tokenizer.model import DARTokenizer
    from tokenizer.losses import _build_loss_networks, loss_terms, term_weights, total_loss

    cfg = recipe.config
    t = cfg.train
    model_cfg = replace(cfg.model, grad_checkpointing=ac,
                        diff_decoder=replace(cfg.model.diff_decoder, grad_checkpointing=ac))
    model = DARTokenizer(model_cfg).train()
    if t.loss.repa_weight == 0 and model_cfg.diff_decoder.has_repa_head:
        model.pixel_decoder.repa_out.requires_grad_(False)
    # Random weights: the memory does not depend on them, and no weight file is needed.
    loss_cfg = replace(t.loss, perceptual_pretrained=False, repa_pretrained=False)
    quiet = types.SimpleNamespace(warning=lambda *args, **kwargs: None)  # the random-weights warnings
    nets = _build_loss_networks(loss_cfg, None, quiet)
    weights = term_weights(t.loss)
    use_gan = t.loss.gan_weight > 0  # the worst case: after gan_start_step
    entropy = t.loss.entropy_temperature if t.loss.entropy_weight > 0 else None

    def make_step(batch: int) -> Callable[[], torch.Tensor]:
        images = torch.randn(batch, 3, t.image_size, t.image_size)

        def step() -> torch.Tensor:
            out = model(images, entropy_temperature=entropy, time_sampling=t.time_sampling)
            terms = loss_terms(out, images, nets, weights, use_gan)
            loss, _ = total_loss(terms, weights, False, None)
            return loss

        return step

    modules = [model] + [n for n in (nets.lpips, nets.repa, nets.disc) if n is not None]
    return modules, make_step


_BUILDERS = {"gpt": _build_gpt_step, "tokenizer": _build_tokenizer_step}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an operator creates while it stays alive, and their peak.

    Storages that existed before (parameters, gradients, buffers) are not counted; an operator that
    writes in place or returns a view creates no storage. Cheaper than MemTracker, whose per-operator
    bookkeeping grows with the number of live tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    weakref.finalize(storage, self._release, nbytes)
                    self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out


def measure_step(recipe: Recipe, batch: int, ac: bool, precision: str | None = None) -> StepMemory:
    """Build the recipe's networks on fake tensors and track one forward + backward of ``batch`` samples."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from utils.training import autocast

    precision = precision or recipe.precision
    build = _BUILDERS[recipe.kind]
    # Built on the meta device (initialisers that read values cannot run on fake tensors), then given
    # fake CPU storage. Plain tensor attributes built on the CPU (the GPT's rotary table) are turned
    # into fake tensors when first used.
    with torch.device("meta"):
        modules, make_step = build(recipe, ac)
    with fused_attention_accounting(), FakeTensorMode(allow_non_fake_inputs=True):
        for module in modules:
            module.to_empty(device="cpu")
        step = make_step(batch)
        trainable = _trainable(recipe, modules)
        # Gradients exist before the step (grad accumulation, or the previous step's until zero_grad),
        # so what forward + backward add on top is activations and temporaries only.
        for p in trainable:
            p.grad = torch.zeros_like(p)
        counter = LiveBytes()
        with counter:
            with autocast(torch.device("cpu"), precision):
                loss = step()
            loss.backward()
        activations = counter.peak
    return replace(_count(recipe, modules, trainable), activation_bytes=activations)


def _trainable(recipe: Recipe, modules: list[nn.Module]) -> list[nn.Parameter]:
    trainable = [p for p in modules[0].parameters() if p.requires_grad]
    if recipe.kind == "tokenizer" and len(modules) > 1 and recipe.config.train.loss.gan_weight > 0:
        trainable += list(modules[-1].parameters())  # the discriminator has its own AdamW
    return trainable


def _count(recipe: Recipe, modules: list[nn.Module], trainable: list[nn.Parameter]) -> StepMemory:
    trainable_ids = {id(p) for p in trainable}
    all_params = {id(p): p for m in modules for p in m.parameters()}
    frozen = sum(p.numel() for i, p in all_params.items() if i not in trainable_ids)
    block, root = _fsdp_units(modules[0]) if recipe.kind == "gpt" else (0, 0)
    return StepMemory(
        trainable_params=sum(p.numel() for p in trainable),
        frozen_params=frozen,
        buffer_bytes=sum(b.numel() * b.element_size() for m in modules for b in m.buffers()),
        activation_bytes=0,
        block_params=block,
        root_params=root,
    )


def count_parameters(recipe: Recipe) -> StepMemory:
    """Parameter and buffer sizes of the recipe's networks (built on the meta device); no activations."""
    with torch.device("meta"):
        modules, _ = _BUILDERS[recipe.kind](recipe, False)
    return _count(recipe, modules, _trainable(recipe, modules))


def _fsdp_units(model: nn.Module) -> tuple[int, int]:
    """(largest transformer block, everything else) in parameters: autoregressive.train.shard_model's units."""
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    return max(blocks), sum(p.numel() for p in model.parameters()) - sum(blocks)


class Activations:
    """Activation bytes of the recipe by (micro-batch, checkpointing), each measured once when first asked.

    Measured at the exact micro-batch and depth: the peak is the larger of a per-block phase and the
    head's logits / loss phase, so it is not linear in either and extrapolating from small probes misleads.
    """

    def __init__(self, recipe: Recipe, precision: str | None = None) -> None:
        self.recipe = recipe
        self.precision = precision
        self.counts = count_parameters(recipe)
        self._cache: dict[tuple[int, bool], int] = {}

    def at(self, batch: int, ac: bool) -> int:
        if (batch, ac) not in self._cache:
            self._cache[batch, ac] = measure_step(self.recipe, batch, ac, self.precision).activation_bytes
        return self._cache[batch, ac]


# ------------------------------------------------------------------------------------------------
# The per-GPU total
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Breakdown:
    """Bytes per GPU of one setting; ``rows`` in print order."""

    setting: str
    rows: dict[str, int]

    @property
    def peak(self) -> int:
        return sum(self.rows.values())


def breakdown(recipe: Recipe, acts: Activations, gpus: int, accum: int, fsdp: bool, ac: bool,
              weight_bytes: int = 4) -> Breakdown:
    """Every term of the per-GPU peak for one parallel setting (weights and AdamW states in fp32).

    bf16 autocast keeps the parameters in fp32 (they are the master weights; no extra copy), and its
    bf16 weight casts are activations (measured). Gradients are counted as alive during the whole
    step, which they are from the first micro-batch's backward on.
    """
    m = acts.counts
    shard = gpus if fsdp else 1
    p = m.trainable_params
    rows = {
        "parameters": p * weight_bytes // shard,
        "gradients": p * weight_bytes // shard,
        "optimizer (AdamW 2 states)": 2 * p * weight_bytes // shard,
        "EMA copy": (p * weight_bytes // shard) if recipe.ema else 0,
        "frozen networks + buffers": m.frozen_params * weight_bytes + m.buffer_bytes,
    }
    if fsdp:
        # Unsharded during compute: the root unit (embeddings, final norm, head) for the whole step, the
        # current and the prefetched block, and one block's full gradient before its reduce-scatter.
        rows["FSDP unsharded units"] = (m.root_params + 3 * m.block_params) * weight_bytes
    elif gpus > 1:
        # DDP's reducer copies every gradient into flat buckets (the trainer leaves
        # gradient_as_bucket_view off), so gradients exist twice.
        rows["DDP gradient buckets"] = p * weight_bytes
    micro = recipe.global_batch_size // (gpus * accum)
    rows[f"activations (micro-batch {micro})"] = acts.at(micro, ac)
    return Breakdown(("FSDP" if fsdp else "DDP" if gpus > 1 else "1 GPU"), rows)


def usable_bytes(gpu_memory_gib: float) -> float:
    return (gpu_memory_gib * (1 - MARGIN_FRACTION) - CUDA_CONTEXT_GIB) * GIB


def accum_choices(recipe: Recipe, gpus: int) -> list[int]:
    """Gradient-accumulation steps that split the global batch evenly over ``gpus``, smallest first."""
    per_gpu = recipe.global_batch_size // gpus
    return [k for k in range(1, per_gpu + 1) if per_gpu % k == 0]


def smallest_fit(recipe: Recipe, acts: Activations, gpus: int, budget: float
                 ) -> tuple[str, Breakdown] | None:
    """The first change that fits: more accumulation, then + activation checkpointing, then + FSDP."""
    shipped_ac, shipped_fsdp = recipe.activation_checkpointing, recipe.fsdp
    options = [(shipped_fsdp, shipped_ac)]
    if not shipped_ac:
        options.append((shipped_fsdp, True))
    if recipe.fsdp_supported and not shipped_fsdp and gpus > 1:
        options += [(True, shipped_ac)] + ([(True, True)] if not shipped_ac else [])
    for fsdp, ac in options:
        for accum in accum_choices(recipe, gpus):
            if (fsdp, ac) == (shipped_fsdp, shipped_ac) and accum <= recipe.grad_accum_steps:
                continue
            result = breakdown(recipe, acts, gpus, accum, fsdp, ac)
            if result.peak <= budget:
                changes = [f"grad_accum_steps: {accum}"] if accum != recipe.grad_accum_steps else []
                if ac != shipped_ac:
                    changes.append("activation_checkpointing: true")
                if fsdp != shipped_fsdp:
                    changes.append("fsdp: true")
                return ", ".join(f"train.{c}" for c in changes), result
    return None


def settings_text(fsdp: bool, accum: int, ac: bool) -> str:
    return f"fsdp {str(fsdp).lower()}, grad_accum_steps {accum}, activation_checkpointing {str(ac).lower()}"


def report(recipe: Recipe, gpus: int, gpu_memory_gib: float, acts: Activations | None = None) -> str:
    """The printed estimate: a table of settings, then the ``fits:`` verdict and a suggestion."""
    if recipe.global_batch_size % (gpus * recipe.grad_accum_steps):
        raise UserError(f"global batch {recipe.global_batch_size} does not split over {gpus} GPUs x "
                        f"{recipe.grad_accum_steps} accumulation steps; pick --gpus dividing it")
    acts = acts or Activations(recipe)
    base = acts.counts
    budget = usable_bytes(gpu_memory_gib)
    accum = recipe.grad_accum_steps
    micro = recipe.global_batch_size // (gpus * accum)
    what = "GPT" if recipe.kind == "gpt" else "tokenizer"
    lines = [
        f"recipe: {recipe.path} ({what}, {base.trainable_params / 1e6:.1f}M trainable parameters, "
        f"{base.frozen_params / 1e6:.1f}M frozen)",
        f"step: global batch {recipe.global_batch_size} on {gpus} GPU(s), grad_accum_steps {accum} -> micro-batch "
        f"{micro} per GPU; {recipe.precision} autocast, fp32 weights, AdamW, EMA {'on' if recipe.ema else 'off'}",
        f"usable per GPU: {budget / GIB:.1f} GiB = {gpu_memory_gib:g} GiB - {MARGIN_FRACTION:.0%} margin - "
        f"{CUDA_CONTEXT_GIB:g} GiB CUDA context",
    ]
    columns: list[tuple[str, Breakdown]] = []
    for fsdp in ((False, True) if recipe.fsdp_supported and gpus > 1 else (False,)):
        for ac in (False, True):
            result = breakdown(recipe, acts, gpus, accum, fsdp, ac)
            columns.append((f"{result.setting}{' +AC' if ac else ''}", result))
    names: list[str] = []
    for _, result in columns:
        names += [n for n in result.rows if n not in names]
    width = max(len(n) for n in names) + 2
    lines.append("per GPU (GiB)".ljust(width) + "".join(title.rjust(11) for title, _ in columns))
    for name in names:
        lines.append(name.ljust(width) + "".join(f"{r.rows.get(name, 0) / GIB:11.2f}" for _, r in columns))
    lines.append("peak".ljust(width) + "".join(f"{r.peak / GIB:11.2f}" for _, r in columns))
    if not recipe.fsdp_supported:
        lines.append("(FSDP: not available in tokenizer.train)")
    shipped = breakdown(recipe, acts, gpus, accum, recipe.fsdp, recipe.activation_checkpointing)
    fits = shipped.peak <= budget
    lines.append(f"fits: {'yes' if fits else 'no'} (peak {shipped.peak / GIB:.1f} GiB of {budget / GIB:.1f} GiB) "
                 f"with {settings_text(recipe.fsdp, accum, recipe.activation_checkpointing)}")
    if fits and recipe.activation_checkpointing:
        plain = breakdown(recipe, acts, gpus, accum, recipe.fsdp, False)
        if plain.peak <= budget:
            lines.append(f"faster: it also fits without activation checkpointing (peak {plain.peak / GIB:.1f} GiB); "
                         "set train.activation_checkpointing: false to skip recomputing the blocks in the backward")
    if not fits:
        found = smallest_fit(recipe, acts, gpus, budget)
        if found is None:
            lines.append("suggest: nothing fits on this many GPUs of this size; use more or larger GPUs")
        else:
            change, result = found
            lines.append(f"suggest: set {change} in the recipe (peak {result.peak / GIB:.1f} GiB)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m scripts.estimate_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training recipe: configs/ar/*.yaml or configs/tokenizer/train_*.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (world size)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        raise UserError("--gpus must be >= 1 and --gpu-memory > 0 (GiB per GPU)")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    text = report(load_recipe(args.config), args.gpus, args.gpu_memory)
    print(text)
    return text


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.estimate_memory ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
