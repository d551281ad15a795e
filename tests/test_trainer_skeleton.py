"""utils.trainer: the skeleton both trainers share (short functions, one export rule, old checkpoints resume)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import torch

import autoregressive.train
import tokenizer.train
import utils.trainer
from tests.extraction_testing import REPO
from tests.test_train_user_errors import ar_argv, make_codes
from utils.run import read_metrics
from utils.trainer import final_exports

TRAINERS = [REPO / "tokenizer" / "train.py", REPO / "autoregressive" / "train.py"]
MAX_FUNCTION_LINES = 80


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_trainer_function_is_longer_than_80_lines() -> None:
    for path in TRAINERS:
        for node in _functions(path):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1  # the whole def: decorators, signature, docstring, body
            assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} has {length} lines"


def test_trainers_pass_no_state_through_nested_functions() -> None:
    # State lives in utils.trainer.TrainState; a nested def would be a closure over mutable locals.
    for path in TRAINERS:
        for outer in _functions(path):
            nested = [n.name for n in ast.walk(outer) if n is not outer and isinstance(n, ast.FunctionDef)]
            assert not nested, f"{path.name}: {outer.name} defines {nested}"


def test_one_export_rule_for_both_trainers() -> None:
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    # final/ = the weights to sample with (the EMA when kept), final_raw/ = the trained weights beside an EMA.
    assert final_exports(SimpleNamespace(model=model, ema=ema)) == {"final": ema, "final_raw": model}
    assert final_exports(SimpleNamespace(model=model, ema=None)) == {"final": model}
    # Both trainers run the shared loop and export through it, with the same run options.
    for trainer in (tokenizer.train, autoregressive.train):
        assert trainer.finish is utils.trainer.finish and trainer.run_loop is utils.trainer.run_loop
    assert issubclass(tokenizer.train.TokenizerRunOptions, utils.trainer.RunOptions)
    assert autoregressive.train.RunOptions is utils.trainer.RunOptions


def test_a_gpt_checkpoint_with_the_old_log_window_resumes_exactly(tmp_path: Path) -> None:
    codes = make_codes(tmp_path / "codes")
    whole = tmp_path / "whole"
    autoregressive.train.main(*autoregressive.train.parse_args(ar_argv(codes, whole, "--log-every", "2",
                                                                       "--keep-last", "5")))
    # A run killed during step 2: its step-1 checkpoint holds one step in the log window. Checkpoints
    # written before the trainers shared utils.trainer kept the GPT's window as loss_sum.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    state = torch.load(whole / "checkpoints" / "step_0000001.pt", weights_only=True)
    window = state["extra"]["window"]
    assert window["count"] == 1
    state["extra"]["window"] = {"loss_sum": window["loss"], "count": 1}
    torch.save(state, cut / "checkpoints" / "step_0000001.pt")
    autoregressive.train.main(*autoregressive.train.parse_args(ar_argv(codes, cut, "--log-every", "2",
                                                                       "--keep-last", "5", "--resume", "auto")))

    def logged(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]

    assert logged(cut) == logged(whole) and [s for s, _ in logged(cut)] == [2, 3]
