"""Turn a GPT training checkpoint into the single-file weights that ``GPT.from_pretrained`` and the samplers read.

    python -m autoregressive.export_checkpoint RUN/checkpoints/step_0050000 OUT_DIR [--raw]

FSDP runs write sharded checkpoints (``RUN/checkpoints/step_XXXXXXX/``, see ``utils.sharded_checkpoint``);
this reads one in a single process, without a process group or GPU, and writes ``OUT_DIR`` exactly as
``final/`` is written (``GPT.save_pretrained``: ``model.safetensors`` + ``config.yaml``). The exported
weights follow the trainer's export rule: the EMA when the run keeps one, the trained weights with
``--raw`` (or when there is no EMA). ``RUN/checkpoints/latest`` or ``RUN/checkpoints`` picks the newest
checkpoint; a single-file ``step_XXXXXXX.pt`` is accepted too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from autoregressive.config import GPTConfig
from autoregressive.model import GPT, build_gpt
from utils.checkpoint import follow_pointer, is_sharded_checkpoint
from utils.cli import OneLineArgumentParser
from utils.config import dataclass_from_dict
from utils.errors import UserError, require_path, run_cli
from utils.sharded_checkpoint import load_module_weights, read_meta


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, raw: bool = False) -> Path:
    """Write ``out_dir`` (``GPT.save_pretrained`` layout) from a training checkpoint; returns ``out_dir``."""
    path = follow_pointer(checkpoint)
    if not is_sharded_checkpoint(path):
        if path.is_dir():
            raise UserError(f"{path} is neither a sharded checkpoint nor a checkpoint file; pass "
                            "RUN/checkpoints/step_XXXXXXX or RUN/checkpoints/latest")
        return GPT.from_pretrained(path, ema=not raw).save_pretrained(out_dir)
    meta = read_meta(path)
    model_section = (meta.get("config") or {}).get("model")
    if not isinstance(model_section, dict):
        raise UserError(f"{path} carries no GPT config: it was not written by autoregressive.train")
    config = dataclass_from_dict(GPTConfig, model_section, _where="model")
    name = "model" if raw or "ema" not in meta["modules"] else "ema"
    with torch.device("meta"):
        template = GPT(config)
    shapes = {key: torch.empty(value.shape, dtype=value.dtype) for key, value in template.state_dict().items()}
    gpt = build_gpt(config, load_module_weights(path, name, shapes))
    return gpt.save_pretrained(out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m autoregressive.export_checkpoint",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="RUN/checkpoints/step_XXXXXXX (sharded), a step_*.pt file or RUN/checkpoints/latest")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.yaml into")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    require_path(args.checkpoint, "checkpoint", "pass RUN/checkpoints/step_XXXXXXX or RUN/checkpoints/latest")
    out = export_checkpoint(args.checkpoint, args.out_dir, raw=args.raw)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
