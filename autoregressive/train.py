"""Train the class-conditional GPT on tokenizer codes (docs/method.md §2 "Training recipe").

    torchrun --nproc_per_node=8 -m autoregressive.train --config configs/ar/gpt_l.yaml \
        --code-path codes/imagenet256 --results-dir results/gpt_l

(``python -m autoregressive.train ...`` runs the same thing in one process.) Codes come either from a
folder written by ``tokenizer.extract_codes`` (``--code-path``; one stored view per sample, drawn
from (seed, epoch, index)), or are encoded on the fly by the frozen EMA tokenizer from images
(``--data-path`` + ``--tokenizer-ckpt``; ``dataset.images.RandomTenCrop`` views, fp32 encoding, the
same as extraction).

The recipe is one YAML (``configs/ar/*.yaml``): ``model:`` is the :class:`GPTConfig` (``preset:``
plus overrides allowed) and ``train:`` is :class:`ARTrainSettings`; unknown keys are errors. CLI
flags override single fields; the fully resolved :class:`ARTrainConfig` is written to
``RESULTS/config.yaml`` and stored in every checkpoint.

The loop, checkpoints, metrics and export are ``utils.trainer``'s, shared with ``tokenizer.train``.
Run folder (``utils.run.RunFolder``): ``config.yaml``; ``metrics.jsonl`` with one line per logged
step (``step``, ``epoch``, ``loss`` = mean over the steps since the previous line, ``lr``,
``grad_norm`` of the logged step, ``images_per_s`` = code sequences per second summed over ranks;
with on-the-fly encoding a ``bad_files`` record at every epoch end);
``checkpoints/step_XXXXXXX.pt`` (``utils.training`` layout: modules ``model`` and, with EMA,
``ema``; optimizer; data position; RNG of every rank; plus top-level ``model`` / ``ema`` /
``gpt_config`` so that ``GPT.from_pretrained(checkpoint, ema=...)`` reads it directly), or with
``--fsdp`` sharded ``checkpoints/step_XXXXXXX/`` folders (``utils.sharded_checkpoint``: every rank
writes its shards, nothing is gathered) that ``python -m autoregressive.export_checkpoint CKPT OUT``
turns into the ``final/`` format;
``samples/step_XXXXXXX.png`` with ``train.sample.every``; at the end ``final/`` (the weights to
sample with: the EMA when the run keeps one) and, with an EMA, ``final_raw/`` (the trained weights
without averaging), written by ``GPT.save_pretrained`` for the sampling CLIs. ``--resume auto``
continues from the latest checkpoint, and a run killed at any moment and resumed on the same world
size logs exactly the losses of an uninterrupted run. Resume is elastic: each global step trains on
the same samples at any world size (``dataset.sampler``'s global-batch layout) with per-sample
dropout draws (``autoregressive.train_draws``), so a run continued on another number of ranks, at
the same global batch, follows the same trajectory up to float summation order.
``--stop-after-step`` ends a launch early (with a checkpoint) without changing the schedule;
``--init-from WEIGHTS`` starts a fine-tuning run from GPT weights (official or ours; weights only).

Parallelism: DDP by default (nccl on CUDA, gloo on CPU); ``--fsdp`` shards every transformer block
with FSDP2 ``fully_shard`` (an FSDP run resumes a DDP checkpoint, and a sharded checkpoint loads
into a DDP run); ``train.grad_accum_steps`` splits each rank's batch into micro-batches.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from autoregressive import train_draws
from autoregressive.config import GPT_PRESETS, GPTConfig
from autoregressive.loading import GPTLoadError, read_gpt_checkpoint
from autoregressive.model import GPT, TransformerBlock, build_gpt
from autoregressive.stream import image_seed, sample_images
from dataset.codes import MANIFEST, CodeDataset
from dataset.images import ImageBatch, RandomTenCrop, collate_skip_bad, to_model_range
from dataset.shards import open_images, require_data_path
from dataset.sampler import ResumableDistributedSampler
from tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig
from tokenizer.model import DARTokenizer
from utils.checkpoint import follow_pointer
from utils.hub import OFFICIAL_REPO_ID
from utils.cli import OneLineArgumentParser
from utils.config import ConfigError, dataclass_from_dict, dataclass_to_dict, keys_fit, load_yaml
from utils.distributed import DistEnv, gradient_sync, resolve_device, run_then_cleanup, seed_everything, setup_distributed
from utils.errors import PathNotFoundError, UserError, call_cli, require_path
from utils.images import save_grid, to_uint8
from utils.run import create_logger
from utils.trainer import (
    RunContext,
    RunOptions,
    StepResult,
    TrainState,
    apply_update,
    clip_gradients,
    create_run_folder,
    finish,
    next_batch,
    open_run,
    reduce_micro_batches,
    resume,
    run_loop,
    run_options_from_args,
    track_bad_files,
)
from utils.training import (
    InfiniteLoader,
    NonFiniteGuard,
    CompileSetting,
    OptimConfig,
    WandbLogger,
    add_common_train_args,
    autocast,
    build_optimizer,
    check_finite_weights,
    check_optim,
    check_positive_ints,
    check_weights_source,
    create_ema,
    default_precision,
    finish_cli_config,
    learning_rate,
    normalise_common_args,
    resolve_compile,
    set_lr,
    unwrap_model,
)

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
# Paper recipe (docs/method.md §2 "Training recipe"): AdamW 4e-4, betas (0.9, 0.95), wd 0.05 on
# matrices, clip 1.0, linear decay to 1e-5 over the last 50 of 300 epochs; EMA optional (0.9999 when
# on, 0 = off).
PAPER_OPTIM = OptimConfig(
    lr=4e-4, betas=(0.9, 0.95), weight_decay=0.05, decay_matrices_only=True, schedule="linear", min_lr=1e-5,
    grad_clip=1.0, ema_decay=0.0,
)


@dataclass(frozen=True)
class ARDataConfig:
    """Where codes come from: ``code_path`` (extracted) or ``data_path`` + ``tokenizer_ckpt`` (on the fly)."""

    code_path: str | None = None
    data_path: str | None = None
    tokenizer_ckpt: str | None = None
    tokenizer_filename: str | None = None
    image_size: int = 256
    crop_ratio: float = 1.1  # ten crops of the ADM centre crop at 1.1 x image_size (281 px for 256)
    num_workers: int = 4


@dataclass(frozen=True)
class ARSampleConfig:
    """Sample grids written to ``RESULTS/samples/step_XXXXXXX.png`` during training (0 = never).

    Needs ``data.tokenizer_ckpt`` to decode; uses the EMA weights when EMA is on. Image i has seed
    ``image_seed(seed, i)`` as in the sampling CLIs, so grids of different steps are comparable.
    """

    every: int = 0
    labels: tuple[int, ...] = (207, 360, 387, 974, 88, 979, 417, 279)
    cfg_scale: tuple[float, float] = (1.1, 8.0)  # linear over the codes (docs/method.md §2 "Sampling", GPT-L setting)
    seed: int = 0


@dataclass(frozen=True)
class ARTrainSettings:
    """The ``train:`` section of a recipe."""

    global_batch_size: int = 1024
    # Micro-batches per optimizer step (gradient accumulation): per-rank forward batch is
    # global_batch_size / (world size x grad_accum_steps). The recipe does not depend on it.
    grad_accum_steps: int = 1
    epochs: int = 300
    max_steps: int | None = None  # None: epochs x steps per epoch
    # With optim.schedule "linear": decay to optim.min_lr over this many final epochs
    # (optim.decay_start_step is derived from it and must be left at 0 in the YAML).
    decay_epochs: float = 50.0
    optim: OptimConfig = PAPER_OPTIM
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 5000
    # FSDP2 (fully_shard per transformer block) instead of DDP, for XL / XXL. Checkpoints are then
    # sharded folders (utils.sharded_checkpoint), loadable at any world size and by DDP runs too.
    fsdp: bool = False
    # Recompute every transformer block in backward (GPT.set_activation_checkpointing): ~1/3 more
    # compute for far fewer stored activations; the trained network is the same.
    activation_checkpointing: bool = False
    # torch.compile the GPT: "auto" = on CUDA, off on the CPU; true / false force it (--compile / --no-compile).
    compile: CompileSetting = "auto"
    # Fine-tune: start from these GPT weights (official file, our checkpoint / folder / final/, hub id),
    # their EMA when they keep one; weights only, ignored when resuming.
    init_from: str | None = None
    data: ARDataConfig = field(default_factory=ARDataConfig)
    sample: ARSampleConfig = field(default_factory=ARSampleConfig)


@dataclass(frozen=True)
class ARTrainConfig:
    model: GPTConfig
    train: ARTrainSettings


RECIPE_EXAMPLE = "configs/ar/tiny.yaml"


def resolve_model_section(value: Any, path: str | Path) -> GPTConfig:
    """``model:`` of a recipe → :class:`GPTConfig`: a preset name or a mapping (optional ``preset:`` + overrides)."""
    if isinstance(value, str) and value in GPT_PRESETS:
        return GPT_PRESETS[value]
    if isinstance(value, str) and (value in TOKENIZER_PRESETS or Path(value).suffix in (".yaml", ".yml")):
        raise ConfigError(f"{path} is a tokenizer training recipe (for tokenizer.train); pass a GPT training "
                          f"recipe such as {RECIPE_EXAMPLE}")
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: model: expected a GPT preset ({', '.join(GPT_PRESETS)}) or a mapping of "
                          f"GPTConfig fields, got {value!r}")
    section = dict(value)
    preset = section.pop("preset", None)
    if preset is not None:
        if preset not in GPT_PRESETS:
            raise ConfigError(f"{path}: unknown GPT preset {preset!r}; choose from {', '.join(GPT_PRESETS)}")
        section = {**dataclass_to_dict(GPT_PRESETS[preset]), **section}
    return dataclass_from_dict(GPTConfig, section, _where="model")


def load_ar_config(path: str | Path) -> ARTrainConfig:
    """Strictly load a recipe: top-level ``model`` and ``train`` (both required)."""
    data = load_yaml(path)
    model = data.get("model")
    if keys_fit(TokenizerConfig, data) or (keys_fit(TokenizerConfig, model) and not keys_fit(GPTConfig, model)):
        raise ConfigError(f"{path} is a tokenizer config; autoregressive.train needs a GPT training recipe such as "
                          f"{RECIPE_EXAMPLE}")
    if keys_fit(GPTConfig, data) or (set(data) == {"model"} and isinstance(model, dict)):
        raise ConfigError(f"{path} is a model config; pass a training recipe such as {RECIPE_EXAMPLE} "
                          "(model: and train: sections)")
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected 'model' and 'train'")
    if "model" not in data:
        raise ConfigError(f"{path}: a GPT training recipe needs a 'model' entry (see {RECIPE_EXAMPLE})")
    gpt = resolve_model_section(model, path)
    train = dataclass_from_dict(ARTrainSettings, data.get("train") or {}, _where="train")
    return ARTrainConfig(model=gpt, train=train)


def apply_overrides(cfg: ARTrainConfig, args: argparse.Namespace) -> ARTrainConfig:
    """CLI flags that are set replace the recipe's fields."""
    t = cfg.train
    optim_changes = {k: v for k, v in (("lr", args.lr), ("max_bad_steps", args.max_bad_steps),
                                       ("ema_decay", args.ema_decay)) if v is not None}
    data_changes = {k: getattr(args, k) for k in ("code_path", "data_path", "tokenizer_ckpt", "tokenizer_filename",
                                                  "num_workers") if getattr(args, k) is not None}
    if args.code_path is not None and args.data_path is None:
        data_changes["data_path"] = None
    if args.data_path is not None and args.code_path is None:
        data_changes["code_path"] = None
    train_changes: dict[str, Any] = {k: v for k, v in (
        ("max_steps", args.max_steps), ("global_batch_size", args.global_batch_size), ("epochs", args.epochs),
        ("grad_accum_steps", args.grad_accum_steps),
        ("log_every", args.log_every), ("ckpt_every", args.ckpt_every), ("seed", args.seed),
        ("init_from", args.init_from),
    ) if v is not None}
    if args.precision != "auto":
        train_changes["precision"] = args.precision
    if args.compile is not None:
        train_changes["compile"] = bool(args.compile)
    if args.fsdp:
        train_changes["fsdp"] = True
    if args.sample_every is not None:
        train_changes["sample"] = replace(t.sample, every=args.sample_every)
    t = replace(t, optim=replace(t.optim, **optim_changes), data=replace(t.data, **data_changes), **train_changes)
    model = GPT_PRESETS[args.gpt_model] if getattr(args, "gpt_model", None) else cfg.model
    return replace(cfg, model=model, train=t)


def check_settings(t: ARTrainSettings) -> None:
    """Every setting in range before anything is built or written (a :class:`ConfigError` names the flag)."""
    d = t.data
    if (d.code_path is None) == (d.data_path is None):
        raise ConfigError("give exactly one data source: --code-path DIR (extracted codes) or --data-path IMAGES")
    if d.data_path is not None and d.tokenizer_ckpt is None:
        raise ConfigError("--data-path encodes images on the fly and needs --tokenizer-ckpt")
    if d.code_path is not None and d.tokenizer_ckpt is not None and t.sample.every == 0:
        raise ConfigError("--tokenizer-ckpt with --code-path only decodes sample grids: set --sample-every too")
    if t.sample.every > 0 and d.tokenizer_ckpt is None:
        raise ConfigError("--sample-every needs --tokenizer-ckpt to decode the sampled codes")
    if t.sample.every < 0 or (t.sample.every > 0 and not t.sample.labels):
        raise ConfigError("--sample-every (train.sample.every) must be >= 0 and, when on, train.sample.labels "
                          "non-empty")
    check_positive_ints(t, {"global_batch_size": "--global-batch-size", "grad_accum_steps": "--grad-accum-steps",
                            "epochs": "--epochs", "log_every": "--log-every", "ckpt_every": "--ckpt-every"})
    if t.max_steps is not None:
        check_positive_ints(t, {"max_steps": "--max-steps"})
    check_positive_ints(d, {"num_workers": "--num-workers"}, "data.", minimum=0)
    check_positive_ints(d, {"image_size": None}, "data.")
    check_optim(t.optim)
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision {t.precision!r}: use fp32 or bf16 (fp16 would need loss scaling)")
    resolve_compile(t.compile, torch.device("cpu"))  # true, false or auto
    if not (math.isfinite(t.decay_epochs) and t.decay_epochs >= 0):
        raise ConfigError(f"train.decay_epochs must be a finite number >= 0, got {t.decay_epochs}")


def check_inputs(d: ARDataConfig) -> None:
    """The data source and tokenizer exist (before the run folder is created)."""
    if d.code_path is not None:
        require_path(d.code_path, "--code-path", "pass the folder written by python -m tokenizer.extract_codes")
        if not (Path(d.code_path).expanduser() / MANIFEST).is_file():
            raise PathNotFoundError(Path(d.code_path) / MANIFEST, "--code-path must be a folder written by "
                                    "python -m tokenizer.extract_codes (extract codes first)")
    if d.data_path is not None:
        require_data_path(d.data_path, "--data-path")
    check_weights_source(d.tokenizer_ckpt, "--tokenizer-ckpt")


def resolve_schedule(t: ARTrainSettings, steps_per_epoch: int) -> ARTrainSettings:
    """Fill in max_steps (from epochs) and the linear schedule's decay_start_step (from decay_epochs).

    A recipe leaves decay_start_step at 0; a resolved config (a run's config.yaml) may carry the
    derived value, which must then agree with this derivation.
    """
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    optim = t.optim
    if optim.schedule == "linear":
        decay_start = max(0, max_steps - round(t.decay_epochs * steps_per_epoch))
        if optim.decay_start_step not in (0, decay_start):
            raise ConfigError(
                f"train.optim.decay_start_step {optim.decay_start_step} disagrees with train.decay_epochs "
                f"{t.decay_epochs} (which gives {decay_start} here); set it to 0 and use decay_epochs"
            )
        optim = replace(optim, decay_start_step=decay_start)
    return replace(t, max_steps=max_steps, optim=optim)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
class CodeSource:
    """Turns a loader batch into (codes (B, N), labels (B,)) on the device."""

    def __init__(self, device: torch.device, tokenizer: nn.Module | None = None) -> None:
        self.device = device
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            codes, labels = batch
            return codes.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        assert isinstance(batch, ImageBatch)
        labels = batch.labels.to(self.device, non_blocking=True)
        if labels.numel() == 0:  # every file of this rank's batch was bad
            return torch.empty(0, 0, dtype=torch.long, device=self.device), labels
        return self.tokenizer.encode(to_model_range(batch.images.to(self.device, non_blocking=True))), labels


def build_data(
    t: ARTrainSettings, cfg_model: GPTConfig, env: DistEnv
) -> tuple[Any, CodeSource, Any, DARTokenizer | None]:
    """(dataset, code source, collate_fn, tokenizer or None) after checking that they fit the model."""
    d = t.data
    tokenizer = None
    if d.tokenizer_ckpt is not None:
        tokenizer = DARTokenizer.from_pretrained(d.tokenizer_ckpt, d.tokenizer_filename, device=env.device).eval()
        tokenizer.requires_grad_(False)
    if d.code_path is not None:
        dataset = CodeDataset(d.code_path, seed=t.seed)
        seq_len, vocab, max_label = dataset.seq_len, dataset.vocab_size, int(dataset.labels.max())
        source, collate = CodeSource(env.device), None
        what = f"codes in {d.code_path}"
    else:
        dataset = open_images(d.data_path, RandomTenCrop(d.image_size, d.crop_ratio, uint8=True), seed=t.seed)
        seq_len, vocab = tokenizer.config.num_all_queries, tokenizer.config.vq_codebook_size
        max_label = int(dataset.labels.max())  # an int64 array (folders and shards alike)
        source, collate = CodeSource(env.device, tokenizer), collate_skip_bad
        what = f"tokenizer {d.tokenizer_ckpt}"
    problems = []
    if seq_len != cfg_model.block_size:
        problems.append(f"{seq_len} codes per image but model.block_size is {cfg_model.block_size}")
    if vocab != cfg_model.vocab_size:
        problems.append(f"vocabulary {vocab} but model.vocab_size is {cfg_model.vocab_size}")
    if max_label >= cfg_model.num_classes:
        problems.append(f"labels up to {max_label} but model.num_classes is {cfg_model.num_classes}")
    if t.sample.every and max(t.sample.labels) >= cfg_model.num_classes:
        problems.append(f"train.sample.labels go up to {max(t.sample.labels)}")
    if tokenizer is not None and d.code_path is not None and (
            tokenizer.config.num_all_queries, tokenizer.config.vq_codebook_size) != (seq_len, vocab):
        problems.append(f"the sampling tokenizer {d.tokenizer_ckpt} does not match the codes")
    if problems:
        raise ConfigError(f"{what} do not fit the model: " + "; ".join(problems))
    return dataset, source, collate, tokenizer


@torch.no_grad()
def save_samples(cfg: ARTrainConfig, state: dict[str, torch.Tensor], tokenizer: DARTokenizer, path: Path,
                 device: torch.device, precision: str) -> None:
    """Rank 0: sample one row of ``cfg.train.sample.labels`` from a copy of the weights and save the grid."""
    sample = cfg.train.sample
    labels = torch.tensor(sample.labels, device=device)
    seeds = [image_seed(sample.seed, i) for i in range(len(sample.labels))]
    # Sampling must leave the training RNG streams (and so exact resume) untouched; build_gpt
    # (meta-device build, no random init) and the per-image generators draw nothing, and the fork
    # guarantees it.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        gpt = build_gpt(cfg.model, state).to(device)
        with autocast(device, precision):
            _, images = sample_images(gpt, tokenizer, labels, seeds=seeds, cfg_scale=sample.cfg_scale)
    save_grid([to_uint8(images)], path)


# -- FSDP2 -----------------------------------------------------------------------------------------
class _FullStateModule(nn.Module):
    """Presents an FSDP2-sharded module to the shared checkpoint helpers as one full state dict.

    ``utils.training`` saves on rank 0 only, but gathering a sharded state is collective: the full
    state is gathered on every rank first (``gather``) and handed over through this stand-in.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._sharded = [module]  # a list, so it is not registered as a submodule
        self._full: dict[str, torch.Tensor] | None = None

    def gather(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self._full = get_model_state_dict(self._sharded[0], options=options)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self._full is None:
            raise RuntimeError("call gather() on every rank before saving")
        return self._full

    def release(self) -> None:
        self._full = None

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=strict)
        return set_model_state_dict(self._sharded[0], state_dict, options=options)


class _FullStateOptimizer:
    """The optimizer counterpart of :class:`_FullStateModule`.

    The gathered state is keyed by parameter name; it is stored with the plain optimizer's integer
    keys instead, so DDP and FSDP checkpoints share one layout and either can resume the other.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        self.order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        self._full: dict[str, Any] | None = None

    def gather(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self._full = get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def state_dict(self) -> dict[str, Any]:
        if self._full is None:
            raise RuntimeError("call gather() on every rank before saving")
        return _rekey_optimizer_state(self._full, {name: i for i, name in enumerate(self.order)})

    def release(self) -> None:
        self._full = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = _rekey_optimizer_state(state_dict, dict(enumerate(self.order)))
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _rekey_optimizer_state(state: dict[str, Any], key_map: dict[Any, Any]) -> dict[str, Any]:
    """Rename the parameter keys of an optimizer state dict (names <-> integer positions)."""
    unknown = sorted(map(str, {k for g in state["param_groups"] for k in g["params"]} - set(key_map)))
    if unknown:
        raise KeyError(f"optimizer state names parameters this model does not have: {', '.join(unknown[:10])}")
    return {
        "state": {key_map[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key_map[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def full_state_dict(module: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights; collective under FSDP (every rank calls, rank 0 gets them)."""
    if not fsdp:
        return unwrap_model(module).state_dict()
    holder = _FullStateModule(module)
    holder.gather()
    return holder.state_dict()


def shard_model(model: GPT, precision: str = "fp32") -> GPT:
    """FSDP2: each transformer block is one unit, the rest (embeddings, norm, head) the root unit.

    ``precision`` "bf16" gives FSDP's mixed-precision policy: the fp32 parameters (and the optimizer
    state) stay sharded in fp32, every unit gathers them as bf16 for its forward and backward, and
    gradients are reduced (and kept) in fp32. The step then runs without autocast
    (:func:`uses_fsdp_precision`); the GPT computes its norms, rotary embeddings and logits in fp32
    itself, and the loss is taken in fp32. "fp32" shards without a policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def uses_fsdp_precision(t: ARTrainSettings) -> bool:
    """True when FSDP's bf16 policy already casts the forward (autocast on top would only add casts)."""
    return t.fsdp and t.precision == "bf16"


# ------------------------------------------------------------------------------------------------
# Main: config → data → model → objective → loop
# ------------------------------------------------------------------------------------------------
def check_run_settings(cfg: ARTrainConfig, env: DistEnv) -> tuple[ARTrainConfig, int]:
    """Every setting and input checked; (config with the resolved precision, per-rank micro-batch size)."""
    check_settings(cfg.train)
    check_inputs(cfg.train.data)
    check_weights_source(cfg.train.init_from, "--init-from")
    t = cfg.train
    t = replace(t, precision=default_precision(env.device) if t.precision == "auto" else t.precision,
                compile=resolve_compile(t.compile, env.device))
    if t.global_batch_size % (env.world_size * t.grad_accum_steps):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by world size "
                          f"{env.world_size} x grad_accum_steps {t.grad_accum_steps}")
    if t.fsdp and not env.distributed:
        raise ConfigError("train.fsdp needs several ranks (torchrun); one process trains unsharded")
    return replace(cfg, train=t), t.global_batch_size // (env.world_size * t.grad_accum_steps)


def log_code_views(dataset: Any, logger: Any) -> None:
    if isinstance(dataset, CodeDataset) and dataset.num_augs < 10:
        views = {1: "the centre crop only", 2: "the centre crop and its mirror"}.get(dataset.num_augs, "")
        logger.info(f"codes hold {dataset.num_augs} view(s) per image ({views}); the paper recipe trains on "
                    "ten-crop codes (tokenizer.extract_codes --ten-crop)")


def init_weights(cfg: ARTrainConfig, resume_path: str | None) -> dict[str, torch.Tensor] | None:
    """``--init-from``: the source's weights (its EMA when it keeps one) checked against the recipe's
    model; None without the flag or when resuming (the checkpoint holds the weights)."""
    source = cfg.train.init_from
    if source is None or resume_path is not None:
        return None
    # An official file without a stored config (renamed, say) is read with the recipe's preset.
    preset = next((name for name, preset in GPT_PRESETS.items() if preset == cfg.model), None)
    local = Path(source).expanduser()
    ema = local.exists() and follow_pointer(local).suffix == ".pt"  # training checkpoints: their EMA if kept
    try:
        try:
            state, _ = read_gpt_checkpoint(source, preset=preset if source == OFFICIAL_REPO_ID else None, ema=ema)
        except GPTLoadError as error:
            if preset is None or "does not store a GPT config" not in error.template:
                raise
            state, _ = read_gpt_checkpoint(source, preset=preset, ema=ema)
        return build_gpt(cfg.model, state).state_dict()
    except GPTLoadError as error:
        flags = {"preset": "a recipe whose model is a preset", "filename": "the file's own path", "ema": "EMA"}
        raise UserError(f"--init-from {source}: {error.for_flags(flags)}") from None
    except UserError as error:
        detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise UserError(f"--init-from {source}: {detail}; pass GPT weights that fit the recipe's model") from None


def build_model(cfg: ARTrainConfig, env: DistEnv, logger: Any,
                init_state: dict[str, torch.Tensor] | None = None) -> tuple[GPT, nn.Module | None, nn.Module]:
    """(GPT, its EMA or None, the module the step calls); sharded with FSDP2 or wrapped in DDP."""
    t = cfg.train
    seed_everything(t.seed)  # identical initialisation on every rank
    model = GPT(cfg.model, activation_checkpointing=t.activation_checkpointing).to(env.device)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
        logger.info(f"initialised from {t.init_from}")
    # Codes were range-checked when written (or come from the tokenizer), labels in build_data: the
    # per-step checks would only add host synchronisations.
    model.check_input_values = False
    ema = create_ema(model) if t.optim.ema_decay > 0 else None
    train_draws.install(model)  # per-sample dropout draws: the same at any world size
    logger.info(f"GPT: {model.num_params() / 1e6:.1f}M parameters; EMA {'%g' % t.optim.ema_decay if ema else 'off'}")
    if t.fsdp:
        logger.info("FSDP: " + ("bf16 parameters in forward and backward, fp32 gradient reduction and master weights"
                                if t.precision == "bf16" else "fp32 throughout"))
        model = shard_model(model, t.precision)
        if ema is not None:
            ema = shard_model(ema)  # never runs a forward while training: fp32, no policy
    if t.compile:
        # In place (state-dict keys keep their names); after sharding, as FSDP2 expects.
        model.compile()
    trained: nn.Module = model
    if env.distributed and not t.fsdp:
        trained = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    model.train()
    return model, ema, trained


def build_state(cfg: ARTrainConfig, env: DistEnv, parts: tuple, loader: InfiniteLoader) -> TrainState:
    """The training state: optimizer, guard and what a checkpoint holds (full-state stand-ins under FSDP)."""
    model, ema, trained = parts
    t = cfg.train
    optimizer = build_optimizer(model, t.optim, env.device)
    modules: dict[str, Any] = {"model": model} if ema is None else {"model": model, "ema": ema}
    optimizers: dict[str, Any] = {"optimizer": optimizer}
    if t.fsdp:
        modules = {name: _FullStateModule(m) for name, m in modules.items()}
        optimizers = {"optimizer": _FullStateOptimizer(model, optimizer)}
    return TrainState(model=model, trained=trained, ema=ema, ema_decay=t.optim.ema_decay, optimizer=optimizer,
                      lr=partial(learning_rate, max_steps=t.max_steps, cfg=t.optim), loader=loader,
                      guard=NonFiniteGuard(t.optim.max_bad_steps), modules=modules, optimizers=optimizers)


def main(cfg: ARTrainConfig, opts: RunOptions) -> dict[str, Any]:
    """Train; returns ``{"step": last step, "results_dir": ...}``."""
    return run_then_cleanup(_train, cfg, opts)


def _train(cfg: ARTrainConfig, opts: RunOptions) -> dict[str, Any]:
    """The body of :func:`main`, which tears the process group down after it."""
    env = setup_distributed(opts.device)  # first: --device cuda without a GPU is the first thing to say
    cfg, batch_size = check_run_settings(cfg, env)  # every input is checked before the run folder is created
    run, manager, resume_path = open_run(opts, env)
    t = cfg.train
    init_state = init_weights(cfg, resume_path)

    # -- data (the schedule depends on the dataset size) ----------------------------------------
    dataset, source, collate, tokenizer = build_data(t, cfg.model, env)
    if len(dataset) < t.global_batch_size:
        raise ConfigError(f"{len(dataset)} samples give no full batch of {t.global_batch_size}; pass a smaller "
                          "--global-batch-size")
    # Global batches cut from one permutation per epoch: the same samples per step at any world size.
    sampler = ResumableDistributedSampler(len(dataset), env.world_size, env.rank, seed=t.seed, shuffle=True,
                                          drop_last=True, global_batch_size=t.global_batch_size)
    steps_per_epoch = sampler.num_samples // (batch_size * t.grad_accum_steps)  # whole global batches
    create_run_folder(run, manager, env, resume_path)
    logger = create_logger("autoregressive.train", run.root if env.is_main else None, env.is_main)
    log_code_views(dataset, logger)
    loader = InfiniteLoader(dataset, sampler, batch_size, env.world_size, num_workers=t.data.num_workers,
                            collate_fn=collate, pin_memory=env.device.type == "cuda")
    t = resolve_schedule(t, steps_per_epoch)
    cfg = replace(cfg, train=t)
    run.save_config(cfg)
    logger.info(f"{len(dataset)} samples, {steps_per_epoch} steps/epoch, {t.max_steps} steps, "
                f"batch {t.global_batch_size} over {env.world_size} rank(s), {t.precision} on {env.device}")

    # -- model, objective (next-code cross-entropy, in train_step), state -----------------------
    state = build_state(cfg, env, build_model(cfg, env, logger, init_state), loader)
    last_step = t.max_steps if opts.stop_after_step is None else min(t.max_steps, opts.stop_after_step)
    ctx = RunContext(env=env, run=run, manager=manager, logger=logger, config=cfg, max_steps=t.max_steps,
                     last_step=last_step, log_every=t.log_every, ckpt_every=t.ckpt_every,
                     steps_per_epoch=steps_per_epoch, global_batch_size=t.global_batch_size,
                     aliases=partial(checkpoint_aliases, cfg.model), sharded_checkpoints=t.fsdp, elastic=True)
    if tokenizer is not None and t.data.data_path is not None:  # images encoded on the fly
        track_bad_files(state, ctx, t.data.data_path)

    # -- resume, loop, export ------------------------------------------------------------------
    # Dropout and label dropout draw per sample (autoregressive.train_draws), not from these streams;
    # one seed on every rank keeps whatever else might draw independent of the rank too.
    seed_everything(t.seed)
    if resume_path is not None:
        resume(state, ctx, resume_path)
    ctx.wandb = WandbLogger(opts.wandb, env, opts.wandb_project, run.root.name, cfg)
    run_loop(state, ctx, partial(train_step, source, t, ctx), partial(maybe_save_samples, cfg, tokenizer, ctx))
    return finish(state, ctx, partial(write_final, cfg.model, t.fsdp, env))


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------
def _batch_size(batch: Any) -> int:
    """Rows of a loader batch: decodable images of an ImageBatch, else the (codes, labels) pair's labels."""
    return batch.labels.numel() if isinstance(batch, ImageBatch) else batch[1].numel()


def train_step(source: CodeSource, t: ARTrainSettings, ctx: RunContext, state: TrainState) -> StepResult:
    """``grad_accum_steps`` micro-batches of next-code cross-entropy, then one update."""
    lr = state.lr(state.step)
    set_lr(state.optimizer, lr)
    state.optimizer.zero_grad(set_to_none=True)
    records: list[dict[str, torch.Tensor]] = []
    items = 0
    while len(records) < t.grad_accum_steps:
        batch = next_batch(state, ctx, _batch_size)
        codes, labels = source(batch)  # (B, N), (B,)
        with gradient_sync(state.trained, len(records) == t.grad_accum_steps - 1), \
                train_draws.keys_of(state.model).use(draw_keys(batch, state.loader, t.seed, ctx.env.device)):
            with autocast(ctx.env.device, "fp32" if uses_fsdp_precision(t) else t.precision):
                logits = state.trained(codes, labels)  # (B, N, V), float32
            loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
            (loss / t.grad_accum_steps).backward()
        records.append({"loss": loss.detach()})
        items += labels.shape[0]
    grad_norm = clip_gradients(state.model, t.optim.grad_clip)
    terms = reduce_micro_batches(records)
    applied = apply_update(state, [terms["loss"], grad_norm])
    return StepResult(terms=terms, grad_norm=grad_norm, lr=lr, items=items, applied=applied)


def draw_keys(batch: Any, loader: InfiniteLoader, seed: int, device: torch.device) -> torch.Tensor:
    """(B,) keys of the batch just fetched: its samples' random draws follow them to any rank.

    Codes: the samples' places in the epoch's global order; images (bad files dropped): their dataset indices.
    """
    if isinstance(batch, ImageBatch):
        return train_draws.sample_keys(seed ^ 0x1A5E, loader.epoch, batch.indices).to(device)
    rows = batch[1].shape[0]
    start = loader.consumed_in_epoch // loader.world_size - rows  # this rank's position before the batch
    return train_draws.sample_keys(seed, loader.epoch, loader.sampler.global_positions(start, rows)).to(device)


def checkpoint_aliases(model_config: GPTConfig, state: TrainState) -> dict[str, Any]:
    """Top-level ``model`` / ``ema`` + ``gpt_config``: ``GPT.from_pretrained(checkpoint, ema=...)`` reads them.

    They share storage with the checkpoint's ``modules``, so torch.save writes them once.
    """
    aliases: dict[str, Any] = {name: module.state_dict() for name, module in state.modules.items()}
    aliases["gpt_config"] = dataclass_to_dict(model_config)
    return aliases


def maybe_save_samples(cfg: ARTrainConfig, tokenizer: DARTokenizer | None, ctx: RunContext, state: TrainState) -> None:
    t = cfg.train
    if t.sample.every and state.step % t.sample.every == 0:
        weights = full_state_dict(state.sampling_model, t.fsdp)  # collective under FSDP
        if ctx.env.is_main:
            path = ctx.run.samples / f"step_{state.step:07d}.png"
            save_samples(cfg, weights, tokenizer, path, ctx.env.device, t.precision)
            ctx.logger.info(f"saved samples {path}")


def write_final(model_config: GPTConfig, fsdp: bool, env: DistEnv, module: nn.Module, path: Path) -> None:
    weights = full_state_dict(module, fsdp)  # collective under FSDP
    if env.is_main:
        gpt = build_gpt(model_config, weights)
        check_finite_weights(gpt, f"the GPT weights to {path}")
        gpt.save_pretrained(path)


def parse_args(argv: list[str] | None = None) -> tuple[ARTrainConfig, RunOptions]:
    parser = OneLineArgumentParser(prog="python -m autoregressive.train", description=__doc__.split("\n\n")[0])
    add_common_train_args(parser)
    parser.add_argument("--code-path", default=None, help="folder written by tokenizer.extract_codes")
    parser.add_argument("--data-path", default=None, help="image folder, encoded on the fly (needs --tokenizer-ckpt)")
    parser.add_argument("--tokenizer-ckpt", "--vq-ckpt", dest="tokenizer_ckpt", default=None,
                        help="tokenizer folder, file or hub repo id")
    parser.add_argument("--tokenizer-filename", default=None, help="file inside a hub repo")
    parser.add_argument("--grad-accum-steps", "--gradient-accumulation-steps", dest="grad_accum_steps", type=int,
                        default=None, help="micro-batches per optimizer step")
    parser.add_argument("--gpt-model", default=None, choices=sorted(GPT_PRESETS),
                        help="replace the recipe's model by this preset (LlamaGen's flag; --set model.KEY=... adjusts it)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (when max-steps is unset)")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune from these GPT weights (official file, checkpoint, folder or hub id; ignored "
                             "when resuming)")
    parser.add_argument("--ema-decay", type=float, default=None, help="EMA decay (0 disables; paper option 0.9999)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (XL/XXL)")
    parser.add_argument("--sample-every", type=int, default=None,
                        help="write a sample grid every N steps (needs --tokenizer-ckpt; 0 = never)")
    parser.add_argument("--stop-after-step", type=int, default=None,
                        help="checkpoint and exit after this step without changing the LR schedule (time-limited jobs)")
    args = parser.parse_args(argv)
    resolve_device(args.device)  # --device cuda without a GPU is said before anything else
    cfg = finish_cli_config(apply_overrides(load_ar_config(args.config), normalise_common_args(args)), args)
    return cfg, RunOptions(**run_options_from_args(args))


def cli(argv: list[str] | None = None) -> int:
    """``python -m autoregressive.train ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(lambda: main(*parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(cli())
