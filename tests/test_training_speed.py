"""Speed on GPUs, checked on the CPU: no host synchronisation per training step, a device-side non-finite
guard that leaves a skipped step without a trace, compile resolution, TF32, FSDP's bf16 policy."""

from __future__ import annotations

import copy
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

import autoregressive.train
import tokenizer.train
import utils.trainer
from dataset.images import BadFileStats
from tests.extraction_testing import REPO, make_image_folder, run_module
from tests.test_train_user_errors import make_codes
from utils.distributed import enable_tf32
from utils.run import RunFolder, read_metrics
from utils.training import InfiniteLoader, NonFiniteGuard, resolve_compile, step_unless_skipped, update_ema

AR_TINY = REPO / "configs" / "ar" / "tiny.yaml"
TOK_TINY = REPO / "configs" / "tokenizer" / "train_tiny.yaml"

# Ops that copy a device value to the host (item / bool / int / float / tolist all end in
# _local_scalar_dense) or wait for it to size their output.
_SYNCING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default,
                torch.ops.aten._unique2.default, torch.ops.aten.equal.default}


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that would wait for a CUDA device; paused while the loader makes a batch (CPU workers)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False
        self.active = False  # inside the counted calls (Python-level reads are counted only there)
        self.seen: list[str] = []

    def __enter__(self) -> "HostSyncCounter":
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in _SYNCING_OPS and not self.paused:
            self.count += 1
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def count_syncs_per_step(monkeypatch: pytest.MonkeyPatch, trainer: object) -> list[int]:
    """Patch ``trainer.train_step`` and ``utils.trainer.record_step`` to count host syncs per step.

    Log lines and checkpoints run outside these two: they are the steps allowed to read the device.
    Python-level reads are counted too (``tolist`` does not dispatch an op on the CPU).
    """
    per_step: list[int] = []
    counter = HostSyncCounter()
    original_step, original_record = trainer.train_step, utils.trainer.record_step
    original_tolist = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> object:
        if counter.active and not counter.paused:
            counter.count += 1
            counter.seen.append("tolist")
        return original_tolist(self)

    def paused(fn: object) -> object:
        def call(*args: object) -> object:
            before, counter.paused = counter.paused, True
            try:
                return fn(*args)
            finally:
                counter.paused = before
        return call

    def train_step(*args: object) -> object:
        counter.count = 0
        with counter:
            return original_step(*args)

    def record_step(*args: object) -> None:
        with counter:
            original_record(*args)
        per_step.append(counter.count)

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(utils.trainer, "record_step", record_step)
    # Batches come from CPU workers in real runs, with their bad-file counts (CPU tensors): no device read.
    # (The loader's epoch-end report, once per epoch, reads the device; it runs inside __next__.)
    monkeypatch.setattr(InfiniteLoader, "__next__", paused(InfiniteLoader.__next__))
    monkeypatch.setattr(BadFileStats, "update", paused(BadFileStats.update))
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return per_step


def test_gpt_training_steps_do_not_read_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_step = count_syncs_per_step(monkeypatch, autoregressive.train)
    codes = make_codes(tmp_path / "codes")
    out = tmp_path / "run"
    argv = ["--config", str(AR_TINY), "--code-path", str(codes), "--results-dir", str(out), "--device", "cpu",
            "--global-batch-size", "4", "--max-steps", "6", "--log-every", "3", "--ckpt-every", "6",
            "--ema-decay", "0.9"]
    autoregressive.train.main(*autoregressive.train.parse_args(argv))
    assert per_step == [0] * 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3, 6]


def test_tokenizer_training_steps_do_not_read_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_step = count_syncs_per_step(monkeypatch, tokenizer.train)
    images = make_image_folder(tmp_path / "images", per_class=(2, 2), bad=None)
    recipe = yaml.safe_load(TOK_TINY.read_text())
    recipe["model"] = "tiny"
    recipe["train"].update(global_batch_size=2, max_steps=4, ckpt_every=4, sample_every=100, log_every=2)
    recipe["train"]["loss"].update(perceptual_weight=0.0, repa_weight=0.0, gan_weight=0.5, gan_start_step=1)
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(recipe))
    argv = ["--config", str(path), "--data-path", str(images), "--results-dir", str(tmp_path / "run"),
            "--device", "cpu"]
    tokenizer.train.main(*tokenizer.train.parse_args(argv))
    assert per_step == [0] * 4, per_step
    # The step-2 line, written late, still precedes the epoch-end record of step 3 (fetched in step 3).
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [2, 3, 4], steps


def test_log_lines_are_read_from_the_device_one_step_late(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log step only starts the copy of its values; the line is written once the next step is queued
    (or before a checkpoint), so the device never waits for the host to read a log line."""
    events: list[tuple[str, int]] = []
    counter = HostSyncCounter()
    original_step, original_begin, original_log = (autoregressive.train.train_step, utils.trainer.begin_log,
                                                   RunFolder.log_metrics)
    original_tolist = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> object:
        counter.count += counter.active
        return original_tolist(self)

    def train_step(*args: object) -> object:
        events.append(("step", args[-1].step + 1))
        return original_step(*args)

    def begin_log(*args: object) -> object:
        with counter:
            return original_begin(*args)

    def log_metrics(run: RunFolder, record: dict) -> None:
        events.append(("line", record["step"]))
        original_log(run, record)

    monkeypatch.setattr(autoregressive.train, "train_step", train_step)
    monkeypatch.setattr(utils.trainer, "begin_log", begin_log)
    monkeypatch.setattr(RunFolder, "log_metrics", log_metrics)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    codes = make_codes(tmp_path / "codes")
    out = tmp_path / "run"
    argv = ["--config", str(AR_TINY), "--code-path", str(codes), "--results-dir", str(out), "--device", "cpu",
            "--global-batch-size", "4", "--max-steps", "6", "--log-every", "2", "--ckpt-every", "6"]
    autoregressive.train.main(*autoregressive.train.parse_args(argv))
    assert counter.count == 0, counter.seen  # starting a line reads nothing
    assert events == [("step", 1), ("step", 2), ("step", 3), ("line", 2), ("step", 4), ("step", 5), ("line", 4),
                      ("step", 6), ("line", 6)]  # step 6 checkpoints: its line is written first
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["grad_norm"] > 0 for r in records)


def test_the_guard_read_with_a_log_line_counts_and_aborts_like_a_sync() -> None:
    guard = NonFiniteGuard(max_bad_steps=3)
    for value in (math.nan, math.nan, 1.0, math.nan):
        guard.record(guard.finite(torch.tensor(value)))
    counts = guard.device_counts()
    guard.record(guard.finite(torch.tensor(math.nan)))  # the device keeps counting meanwhile
    assert guard.absorb(counts.tolist()) == 3 and (guard.consecutive, guard.total) == (1, 3)
    assert guard.sync() == 1 and (guard.consecutive, guard.total) == (2, 4)
    guard.record(guard.finite(torch.tensor(math.nan)))
    with pytest.raises(FloatingPointError, match="max-bad-steps=3"):
        guard.absorb(guard.device_counts().tolist())


# ------------------------------------------------------------------------------------------------ the guard
def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: torch.nn.Module, poison: bool) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = model(torch.randn(2, 4)).square().mean() * (math.nan if poison else 1.0)
    loss.backward()
    ok = NonFiniteGuard.finite(loss)
    step_unless_skipped(optimizer, ok)
    update_ema(ema, model, torch.where(ok, torch.tensor(0.9, dtype=torch.float64), 1.0))
    return ok


def test_a_skipped_step_leaves_parameters_moments_step_count_and_ema_exactly_unchanged() -> None:
    model, optimizer = _model_and_optimizer()
    ema = copy.deepcopy(model)
    _step(model, optimizer, ema, poison=False)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), ema.state_dict()))
    assert not bool(_step(model, optimizer, ema, poison=True))
    after = (model.state_dict(), optimizer.state_dict(), ema.state_dict())
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1]["state"], before[1]["state"], rtol=0, atol=0)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    assert not hasattr(optimizer, "found_inf")
    # An applied step after the skipped one equals the same step taken with no skipped step in between.
    twin, twin_optimizer = _model_and_optimizer()
    twin_ema = copy.deepcopy(twin)
    twin.load_state_dict(before[0]), twin_optimizer.load_state_dict(before[1]), twin_ema.load_state_dict(before[2])
    torch.manual_seed(1)
    _step(model, optimizer, ema, poison=False)
    torch.manual_seed(1)
    _step(twin, twin_optimizer, twin_ema, poison=False)
    torch.testing.assert_close(model.state_dict(), twin.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(ema.state_dict(), twin_ema.state_dict(), rtol=0, atol=0)
    assert optimizer.state_dict()["state"][0]["step"].item() == 2


def test_the_guard_counts_on_the_device_and_aborts_at_the_next_read() -> None:
    guard = NonFiniteGuard(max_bad_steps=3)
    for value in (1.0, math.nan, math.inf, 1.0, math.nan):
        guard.record(guard.finite(torch.tensor(value)))
    assert (guard.consecutive, guard.total) == (0, 0)  # nothing read yet
    assert guard.sync() == 3
    assert (guard.consecutive, guard.total) == (1, 3)
    # A run of three that ended before the read still aborts: the longest run is kept on the device.
    for value in (math.nan, math.nan, 1.0):
        guard.record(guard.finite(torch.tensor(value)))
    with pytest.raises(FloatingPointError, match="max-bad-steps=3"):
        guard.state_dict()  # checkpoints read the guard first: nothing is written past the limit


# ------------------------------------------------------------------------------------------------ switches
def test_compile_is_auto_on_cuda_only_and_the_flags_force_it(tmp_path: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert (resolve_compile("auto", cpu), resolve_compile("auto", cuda)) == (False, True)
    assert (resolve_compile(True, cpu), resolve_compile(False, cuda)) == (True, False)
    codes = make_codes(tmp_path / "codes")
    base = ["--config", str(AR_TINY), "--code-path", str(codes), "--results-dir", str(tmp_path / "r")]
    for trainer, extra in ((autoregressive.train, []),):
        assert trainer.parse_args(base)[0].train.compile == "auto"
        assert trainer.parse_args([*base, "--compile"])[0].train.compile is True
        assert trainer.parse_args([*base, "--no-compile"])[0].train.compile is False
    recipe = yaml.safe_load(TOK_TINY.read_text())
    tok = ["--config", str(TOK_TINY), "--data-path", str(tmp_path), "--results-dir", str(tmp_path / "t")]
    assert "compile" not in recipe["train"] and tokenizer.train.parse_args(tok)[0].train.compile == "auto"
    assert tokenizer.train.parse_args([*tok, "--no-compile"])[0].train.compile is False
    assert tokenizer.train.parse_args([*tok, "--compile"])[0].train.compile is True
    # The resolved config a CPU run writes says what it did.
    argv = [*base, "--device", "cpu", "--global-batch-size", "4", "--max-steps", "1"]
    out = autoregressive.train.main(*autoregressive.train.parse_args(argv))
    assert yaml.safe_load((Path(out["results_dir"]) / "config.yaml").read_text())["train"]["compile"] is False
    with pytest.raises(ValueError, match="train.compile"):
        autoregressive.train.parse_args([*base, "--set", "train.compile=sometimes"])


def test_tf32_is_switched_on_for_cuda_only() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        enable_tf32(torch.device("cpu"))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        enable_tf32(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.allow_tf32
        # Still readable both ways (torch.compile reads the legacy switch), also after the Inception's
        # exact-fp32 block has turned TF32 off and back on.
        from evaluations.metrics import exact_fp32

        with exact_fp32():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------------------------ FSDP
def _sharded_forward_dtypes(tmp_path: Path, precision: str) -> tuple[set[torch.dtype], torch.dtype, set[torch.dtype]]:
    """(parameter dtypes the blocks compute with, logits dtype, gradient dtypes) of an FSDP2 GPT in one gloo rank."""
    import torch.distributed as dist

    from autoregressive.model import GPT, TransformerBlock
    from tests.gpt_testing import tiny_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = autoregressive.train.shard_model(GPT(tiny_config()), precision)
        seen: set[torch.dtype] = set()
        for block in (m for m in model.modules() if isinstance(m, TransformerBlock)):
            block.attention.register_forward_pre_hook(lambda m, args: seen.update(p.dtype for p in m.parameters()))
        codes = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
        logits = model(codes, torch.tensor([1, 2]))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten()).backward()
        grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        return seen, logits.dtype, grads
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_policy_gathers_bf16_parameters_and_keeps_fp32_gradients(tmp_path: Path) -> None:
    seen, logits, grads = _sharded_forward_dtypes(tmp_path / "bf16", "bf16")
    assert seen == {torch.bfloat16} and logits == torch.float32 and grads == {torch.float32}
    seen, logits, grads = _sharded_forward_dtypes(tmp_path / "fp32", "fp32")
    assert seen == {torch.float32} and logits == torch.float32 and grads == {torch.float32}
    # With the policy the step runs without autocast; without FSDP (or in fp32) autocast stays as it was.
    settings = autoregressive.train.ARTrainSettings
    assert autoregressive.train.uses_fsdp_precision(settings(fsdp=True, precision="bf16"))
    assert not autoregressive.train.uses_fsdp_precision(settings(fsdp=False, precision="bf16"))
    assert not autoregressive.train.uses_fsdp_precision(settings(fsdp=True, precision="fp32"))


@pytest.mark.slow
def test_two_rank_fsdp_bf16_run_trains_with_finite_losses(tmp_path: Path) -> None:
    codes = make_codes(tmp_path / "codes", count=16)
    out = tmp_path / "run"
    result = run_module("autoregressive.train", ["--config", str(AR_TINY), "--code-path", str(codes), "--results-dir",
                                                 str(out), "--device", "cpu", "--global-batch-size", "4",
                                                 "--max-steps", "4", "--log-every", "1", "--ckpt-every", "4",
                                                 "--fsdp", "--precision", "bf16", "--ema-decay", "0.9"], nproc=2)
    assert "FSDP: bf16 parameters in forward and backward, fp32 gradient reduction" in result.stderr
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert "skipped_steps" not in records[-1]


def test_fused_adamw_skips_on_the_device_with_fsdp_parameters_too(tmp_path: Path) -> None:
    """On CUDA, FSDP's DTensor parameters get the fused AdamW: the skip flag must work through DTensor."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        model, _ = _model_and_optimizer()
        ema = copy.deepcopy(model)
        fully_shard(model), fully_shard(ema)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
        full = lambda module: {k: v.full_tensor().clone() for k, v in module.state_dict().items()}  # noqa: E731
        for poison, changes in ((False, True), (True, False)):
            before, ema_before = full(model), full(ema)
            _step(model, optimizer, ema, poison=poison)
            after, ema_after = full(model), full(ema)
            assert all(torch.equal(before[k], after[k]) != changes for k in before)
            assert all(torch.equal(ema_before[k], ema_after[k]) != changes for k in ema_before)
        assert all(state["step"].item() == 1 for state in optimizer.state.values())
    finally:
        dist.destroy_process_group()
