"""The whole D-AR pipeline on the embedded Fashion-MNIST subset, offline, in one command.

    python -m scripts.demo --out demo_out            # full demo (about 12 minutes on 2 CPU cores)
    python -m scripts.demo --out /tmp/q --quick      # minutes: a smoke run of every stage (what CI runs)

Stages 2–10 are the real entry points of this codebase. Each stage prints its command, what a user would
type to run that stage alone, and by default runs it in the demo's own process by calling the module's
``cli(argv)``, which does what ``python -m`` does with those arguments and returns the exit status; this
saves a fresh interpreter's ~6–7 s of start-up per stage. ``--subprocess`` runs each stage as that command
in its own process instead. Every stage is skipped when its output already exists — so
re-running with the same ``--out`` resumes (the trainers themselves resume from their latest checkpoint
with ``--resume auto``). ``stages.json`` records what each finished stage ran; resuming with other settings
(another seed, an edited ``--config`` file, ``--quick`` or not) stops with what differs instead of mixing
old and new outputs:

 1. data         the shipped Fashion-MNIST subset → class folders of PNGs (train 6000, test 300);
                 from here on everything goes through the normal image-folder dataset code
 2. tokenizer    ``tokenizer.train`` — sequential diffusion tokenizer, 32×32, 32 codes in 4 groups
 3. reconstruct  ``tokenizer.reconstruct`` on held-out images — PSNR/SSIM, input | recon | previews
 4. rfid         ``evaluations.evaluator`` — FID of reconstructions against their inputs
 5. codes        ``tokenizer.extract_codes`` — codes of every training image and its mirror
 6. gpt          ``autoregressive.train`` — class-conditional Llama GPT on those codes
 7. samples      ``autoregressive.sample`` — grid (one row per class), streaming previews (the first
                 sample of each class), GIF
 8. layout       ``autoregressive.layout`` — first groups forced from a held-out T-shirt, sampled as
                 T-shirts and as four other classes
 9. fid          ``autoregressive.sample_ddp`` + ``evaluations.evaluator`` — generation FID against the
                 held-out test images (the reference crops written by the reconstruct stage)
10. classes      ``evaluations.class_consistency`` — a small classifier trained on the real training
                 images judges whether each sample shows the class it was generated for

Outputs in ``--out``: reconstructions.png, samples.png, previews.png, stream.gif, layout.png,
class_consistency.json, report.json, stages.json, plus every run folder (configs, metrics.jsonl, checkpoints,
logs).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from utils.cli import OneLineArgumentParser, non_negative_int
from utils.distributed import resolve_device
from utils.errors import UserError, call_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


@dataclass(frozen=True)
class DemoSettings:
    """Budgets of one demo run; ``quick`` shrinks every stage to a smoke test of the same commands."""

    tokenizer_config: str
    gpt_config: str
    tokenizer_steps: int | None
    gpt_steps: int | None
    recon_images: int
    fid_samples: int
    samples_per_label: int
    classifier_epochs: int
    cfg_scale: str
    image_size: int = 32
    # Pixel-decoder ODE solver for every decoding stage. The demo tokenizer is far from converged, and
    # for it Euler beats the paper's Adams-Bashforth-2: held-out PSNR 13.4 vs 12.6 dB on one full-demo
    # tokenizer and 13.6 vs 12.7 dB on another (4 steps, 300 images). AB2's extrapolation amplifies
    # the error of an imprecise velocity field; it pays off for well-trained tokenizers (paper, 8 steps).
    sampler: str = "euler"
    train_per_class: int | None = None
    test_per_class: int | None = None
    # Start from the shipped Inception features of the held-out set (dataset/fashion_mnist/README.md): saves
    # one Inception pass over the reference images (~40 s on 2 cores). The evaluator checks them against the
    # images and weights by SHA-256 and recomputes them when either differs.
    shipped_reference_features: bool = False


FULL = DemoSettings(
    tokenizer_config="configs/tokenizer/train_demo.yaml",
    gpt_config="configs/ar/demo.yaml",
    tokenizer_steps=None,
    gpt_steps=None,
    recon_images=300,
    fid_samples=300,
    samples_per_label=8,
    classifier_epochs=2,
    cfg_scale="3.0",
    # 30 held-out images per class: the FID reference, the reconstruction set and the judge's test set
    # cover all ten classes (the first 300 files of the class-sorted folder would be three classes).
    test_per_class=30,
    shipped_reference_features=True,
)
QUICK = DemoSettings(
    tokenizer_config="configs/tokenizer/train_demo.yaml",
    gpt_config="configs/ar/demo.yaml",
    tokenizer_steps=4,
    gpt_steps=4,
    recon_images=40,
    fid_samples=20,
    samples_per_label=1,
    classifier_epochs=1,
    cfg_scale="3.0",
    train_per_class=20,
    test_per_class=4,
)


def run(stage: str, args: list[str], log: Callable[[str], None], isolate: bool = False) -> None:
    """Run ``python -m <args>`` from the repo root; its progress bars go straight to the terminal.

    By default the module's ``cli(args[1:])`` runs in this process: each stage then skips the ~6–7 s
    that a new Python process spends importing torch and friends on 2 CPU cores. ``isolate`` runs the
    command in a child process instead. Either way a failing stage stops the demo with a message saying
    how to resume.
    """
    log(f"[{stage}] $ python -m {shlex.join(args)}")  # what to type to run this stage by hand
    start = time.perf_counter()
    if isolate:
        code = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT).returncode
    else:
        try:
            code = _call_in_process(args[0], args[1:])
        except BaseException as error:
            log(f"[{stage}] failed ({type(error).__name__}); re-run the same command to resume")
            raise
    if code != 0:
        raise SystemExit(f"[{stage}] failed with exit code {code}; re-run the same command to resume")
    log(f"[{stage}] done in {time.perf_counter() - start:.0f} s")


def _call_in_process(module: str, argv: list[str]) -> int:
    """``module.cli(argv)`` from the repo root (as the child process of ``isolate`` runs: the configs are
    repo-relative); returns its exit status.

    What a process exit would release is released here: log files the stage opened, unreachable
    objects, cached CUDA memory.
    """
    saved_cwd = os.getcwd()
    files_before = set(_file_handlers())
    try:
        os.chdir(REPO_ROOT)
        return importlib.import_module(module).cli(argv)
    finally:
        os.chdir(saved_cwd)
        for logger, handler in set(_file_handlers()) - files_before:
            logger.removeHandler(handler)
            handler.close()
        gc.collect()  # the stage's models and data go now, not at some later collection
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _file_handlers() -> Iterator[tuple[logging.Logger, logging.FileHandler]]:
    """(logger, handler) for every file handler of every logger in this process."""
    loggers = [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                yield logger, handler


STAGE_RECORDS = "stages.json"


def stage_record(command: list[str], out: Path) -> dict[str, Any]:
    """What decides a stage's outputs: its command (``--device`` aside: any device resumes any other; the
    output folder written as ``{out}``, so a moved folder still resumes) and the SHA-256 of each
    ``--config`` file it names (repo-relative, as the stages run from the repo root)."""
    kept, configs, skip_next = [], {}, False
    for previous, arg in zip([None, *command], command):
        if skip_next:
            skip_next = False
            continue
        if arg == "--device":
            skip_next = True
            continue
        kept.append(arg.replace(str(out), "{out}"))
        if previous == "--config":
            configs[arg] = hashlib.sha256((REPO_ROOT / arg).read_bytes()).hexdigest()
    return {"command": kept, "config_sha256": configs}


def stale_stage_message(name: str, then: dict[str, Any], now: dict[str, Any], out: Path) -> str:
    lines = [f"[{name}] {out} holds this stage's outputs from other settings:"]
    if then["command"] != now["command"]:
        lines += [f"  then: python -m {shlex.join(then['command'])}", f"  now:  python -m {shlex.join(now['command'])}"]
    for path in sorted(set(then["config_sha256"]) | set(now["config_sha256"])):
        if then["config_sha256"].get(path) != now["config_sha256"].get(path):
            lines.append(f"  {path} changed since that run")
    lines.append("Resume it with the settings it was made with, or use a new --out (or delete the folder).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = OneLineArgumentParser(prog="python -m scripts.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (re-running resumes)")
    parser.add_argument("--quick", action="store_true", help="smoke run of every stage in a few minutes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--subprocess", action="store_true",
        help="run every stage in its own Python process (full isolation; ~6-7 s more per stage on 2 CPU cores)",
    )
    args = parser.parse_args(argv)
    resolve_device(args.device)  # --device cuda without a GPU is said before anything is written
    settings = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out} is a file; pass a folder for the demo's outputs")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def log(message: str) -> None:
        print(message, flush=True)

    # What each finished stage ran: resuming with other settings (another --seed, an edited config, a newer
    # demo passing other flags) would otherwise skip that stage and mix its old outputs with new ones.
    records_path = out / STAGE_RECORDS
    records: dict[str, Any] = json.loads(records_path.read_text()) if records_path.is_file() else {}

    def stage(name: str, done: Callable[[], bool], command: list[str]) -> None:
        record = stage_record(command, out)
        if done():
            if name in records and records[name] != record:
                raise SystemExit(stale_stage_message(name, records[name], record, out))
            log(f"[{name}] already done, skipping")
            return
        t0 = time.perf_counter()
        run(name, command, log, args.subprocess)
        timings[name] = round(time.perf_counter() - t0, 1)
        records[name] = record
        atomic_write_text(records_path, json.dumps(records, indent=2) + "\n")

    # 1. data -----------------------------------------------------------------------------------
    from dataset.fashion_mnist import materialize_fashion_mnist
    from utils.checkpoint import atomic_write_text

    data_dir = out / "data"
    try:
        train_dir = materialize_fashion_mnist(data_dir / "train", "train", limit_per_class=settings.train_per_class)
        test_dir = materialize_fashion_mnist(data_dir / "test", "test", limit_per_class=settings.test_per_class)
    except FileExistsError as error:
        raise SystemExit(f"[data] {error}: {out} was made by a demo with other settings (--quick or not?); "
                         "resume it with those settings or use a new --out") from error
    device = ["--device", args.device]

    # 2. tokenizer ------------------------------------------------------------------------------
    tok_dir = out / "tokenizer"
    tok_final = tok_dir / "final"
    tok_steps = ["--max-steps", str(settings.tokenizer_steps)] if settings.tokenizer_steps else []
    stage("tokenizer", lambda: (tok_final / "model.safetensors").is_file(), [
        "tokenizer.train", "--config", settings.tokenizer_config, "--data-path", str(train_dir),
        "--results-dir", str(tok_dir), "--resume", "auto", "--seed", str(args.seed), *tok_steps, *device,
    ])

    # 3. reconstruct ----------------------------------------------------------------------------
    recon = out / "recon" / "recon.npz"
    recon_json = recon.with_suffix(".json")

    def recon_done() -> bool:
        return recon_json.is_file() and (out / "reconstructions.png").is_file()

    stage("reconstruct", recon_done, [
        "tokenizer.reconstruct", "--ckpt", str(tok_final), "--data-path", str(test_dir), "--out", str(recon),
        "--image-size", str(settings.image_size), "--num-images", str(settings.recon_images),
        "--grid", str(out / "reconstructions.png"), "--grid-images", "8", "--num-workers", "0",
        "--seed", str(args.seed), "--sampler", settings.sampler, "--labels", *device,
    ])

    # 4. rFID -----------------------------------------------------------------------------------
    # Both FIDs compare against the same held-out crops: their Inception features are computed once
    # and kept in ref_features.npz (checked against the images and weights by SHA-256 on every use).
    # FID's matrix root comes from symmetric eigenvalues ("eigh"): the same distance as ADM's sqrtm
    # to ~1e-7 relative here, in seconds instead of tens of seconds per root on 2 cores.
    rfid_json = out / "recon" / "rfid.json"
    ref_cache = out / "recon" / "ref_features.npz"
    if settings.shipped_reference_features and not ref_cache.is_file() and not rfid_json.is_file():
        from dataset.fashion_mnist import HELDOUT_FEATURES_PATH

        shutil.copyfile(HELDOUT_FEATURES_PATH, ref_cache)
        log(f"[rfid] reference features: starting from the shipped {HELDOUT_FEATURES_PATH.name}")
    # The demo downloads nothing, and an Inception Score of 32x32 garments would mean nothing.
    fid_options = ["--ref-cache", str(ref_cache), "--fid-method", "eigh", "--is-weights", "none"]
    stage("rfid", rfid_json.is_file, [
        "evaluations.evaluator", str(recon.with_name("recon_ref.npz")), str(recon), "--json", str(rfid_json),
        *fid_options, *device,
    ])

    # 5. codes ----------------------------------------------------------------------------------
    codes_dir = out / "codes"
    stage("codes", lambda: (codes_dir / "manifest.json").is_file(), [
        "tokenizer.extract_codes", "--tokenizer-ckpt", str(tok_final), "--data-path", str(train_dir),
        # Batch 50: on 2 CPU cores the demo encoder runs 930 images/s at 50 and 497 at 250 (cache reuse).
        "--out", str(codes_dir), "--flip", "--image-size", str(settings.image_size), "--batch-size", "50",
        "--shard-size", "2000", "--num-workers", "0", *device,
    ])

    # 6. gpt ------------------------------------------------------------------------------------
    gpt_dir = out / "gpt"
    gpt_final = gpt_dir / "final"
    gpt_steps = ["--max-steps", str(settings.gpt_steps)] if settings.gpt_steps else []
    stage("gpt", lambda: (gpt_final / "model.safetensors").is_file(), [
        "autoregressive.train", "--config", settings.gpt_config, "--code-path", str(codes_dir),
        "--results-dir", str(gpt_dir), "--resume", "auto", "--seed", str(args.seed), *gpt_steps, *device,
    ])

    models = ["--gpt-ckpt", str(gpt_final), "--tokenizer-ckpt", str(tok_final)]

    # 7. samples --------------------------------------------------------------------------------
    labels = ",".join(str(c) for c in range(NUM_CLASSES))
    stage("samples", lambda: (out / "stream.gif").is_file(), [
        "autoregressive.sample", *models, "--labels", labels, "--samples-per-label", str(settings.samples_per_label),
        "--cfg-scale", settings.cfg_scale, "--seed", str(args.seed), "--out", str(out / "samples.png"),
        "--previews", str(out / "previews.png"), "--previews-per-label", "1", "--gif", str(out / "stream.gif"),
        "--sampler", settings.sampler, *device,
    ])

    # 8. layout ---------------------------------------------------------------------------------
    from dataset.images import list_images

    reference = list_images(test_dir)[0]  # the first held-out T-shirt
    stage("layout", lambda: (out / "layout.png").is_file(), [
        "autoregressive.layout", *models, "--reference", str(reference), "--labels", "0,2,3,4,6",
        "--prefix-groups", "1", "--samples-per-label", "4", "--seed", str(args.seed), "--out", str(out / "layout.png"),
        "--sampler", settings.sampler, *device,
    ])

    # 9. generation FID -------------------------------------------------------------------------
    fid_dir = out / "fid"
    samples_npz = fid_dir / "samples" / "samples.npz"
    # The held-out reference is the same ADM centre crop of the first test images that the
    # reconstruction stage already wrote (recon_ref.npz); `evaluations.make_reference` builds the same
    # thing for any folder, but would run Inception over those images once more.
    reference_npz = recon.with_name("recon_ref.npz")
    fid_json = fid_dir / "fid.json"
    stage("fid_samples", samples_npz.is_file, [
        "autoregressive.sample_ddp", *models, "--num-samples", str(settings.fid_samples),
        "--per-proc-batch-size", "100", "--cfg-scale", settings.cfg_scale, "--seed", str(args.seed),
        "--out", str(fid_dir / "samples"), "--sampler", settings.sampler, *device,
    ])
    stage("fid", fid_json.is_file, [
        "evaluations.evaluator", str(reference_npz), str(samples_npz), "--json", str(fid_json), *fid_options, *device,
    ])

    # 10. class consistency ---------------------------------------------------------------------
    # The same judge also scores the tokenizer's reconstructions of the held-out images: how much class
    # identity survives encoding and decoding, i.e. what the tokenizer leaves the generator to work with.
    classes_json = out / "class_consistency.json"
    with np.load(recon) as data:
        labelled = "labels" in data.files  # False only for a folder resumed from a demo before --labels
    also = ["--also", f"reconstructions={recon}"] if labelled else []
    stage("classes", classes_json.is_file, [
        "evaluations.class_consistency", "--train-data", str(train_dir), "--test-data", str(test_dir),
        "--samples", str(samples_npz), *also, "--image-size", str(settings.image_size),
        "--epochs", str(settings.classifier_epochs), "--json", str(classes_json), *device,
    ])

    report = build_report(out, settings, timings, time.perf_counter() - started)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    print_summary(report, out)
    return report


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def tokenizer_loss_weights(run_dir: Path) -> dict[str, float]:
    """The non-zero loss terms the tokenizer run trained with, named as in its log (from its ``config.yaml``)."""
    from tokenizer.losses import term_weights
    from tokenizer.train import load_train_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return {name: w for name, w in term_weights(load_train_config(path).train.loss).items() if w > 0}


def build_report(out: Path, settings: DemoSettings, timings: dict[str, float], seconds: float) -> dict[str, Any]:
    recon = _read_json(out / "recon" / "recon.json")
    rfid = _read_json(out / "recon" / "rfid.json")
    fid = _read_json(out / "fid" / "fid.json")
    classes = _read_json(out / "class_consistency.json")
    recon_judged = classes.get("also", {}).get("reconstructions", {})
    return {
        "mode": "quick" if settings is QUICK else "full",
        "pixel_sampler": settings.sampler,
        "tokenizer": {
            "psnr": recon.get("psnr"),
            "ssim": recon.get("ssim"),
            "rfid": rfid.get("fid"),
            "num_images": recon.get("num_images"),
            "loss_weights": tokenizer_loss_weights(out / "tokenizer"),
            # The judge below on the reconstructions of the held-out images.
            "class_consistency": recon_judged.get("class_consistency"),
            "class_consistency_per_class": recon_judged.get("class_consistency_per_class"),
        },
        "generation": {
            "fid": fid.get("fid"),
            "sfid": fid.get("sfid"),
            "precision": fid.get("precision"),
            "recall": fid.get("recall"),
            "num_samples": fid.get("num_samples"),
            "num_reference": fid.get("num_reference"),
            "cfg_scale": settings.cfg_scale,
            "fid_method": fid.get("fid_method"),
        },
        "class_consistency": classes.get("class_consistency"),
        "classifier_heldout_accuracy": classes.get("classifier_heldout_accuracy"),
        "class_consistency_per_class": classes.get("class_consistency_per_class"),
        "classifier_heldout_accuracy_per_class": classes.get("classifier_heldout_accuracy_per_class"),
        "quality": quality_statement(classes),
        "notes": [
            "FID uses the TF-converted ADM Inception on 32x32 images upsampled to 299 and a few hundred images; "
            "it is only comparable between runs of this demo, not with ImageNet numbers.",
            "class_consistency: share of samples that a small CNN trained on the real training images assigns to "
            "the class they were generated for; classifier_heldout_accuracy is the same CNN on real held-out "
            "images, i.e. the best a perfect generator could score with this judge. tokenizer.class_consistency is "
            "the same judge on the tokenizer's reconstructions of those held-out images (encode, then decode): how "
            "much class identity the tokenizer keeps. Guided samples can score above it (guidance exaggerates the "
            "class), so it is not a ceiling.",
            "No LPIPS/DINOv2 weights exist offline, so the demo tokenizer trains without the perceptual and REPA "
            "terms; tokenizer.loss_weights lists what it used. Its entropy and pixel terms are not in the paper's "
            "recipe: they keep the codebook in use and stand in for LPIPS (see configs/tokenizer/train_demo.yaml).",
        ],
        # Seconds of each stage when it ran, in this invocation or (resumed) an earlier one.
        "stage_seconds": {**_read_json(out / "report.json").get("stage_seconds", {}), **timings},
        "stages_run_this_invocation": list(timings),
        "total_seconds_this_invocation": round(seconds, 1),
    }


def quality_statement(classes: dict[str, Any]) -> str | None:
    """The judge's per-class verdict on the samples in one sentence (None before the judge has run)."""
    per_class = classes.get("class_consistency_per_class")
    if not per_class:
        return None
    real = classes.get("classifier_heldout_accuracy_per_class") or {}
    weak = sorted((score, name) for name, score in per_class.items() if score < 0.5)
    held = [name for name, score in per_class.items() if score >= 0.5]
    text = (f"The judge assigns at least half of the samples to the requested class for {len(held)} of "
            f"{len(per_class)} classes")
    if weak:
        # Next to each weak class, the judge's own accuracy on real held-out images of it: a class the judge
        # cannot recognise in real images either (Fashion-MNIST shirts) is not a generator failure.
        text += "; below half (judge on real images of the class in brackets): " + ", ".join(
            f"{name} {score:.2f}" + (f" ({real[name]:.2f})" if name in real else "") for score, name in weak
        )
    return text + (". Look at samples.png: within a 15-minute budget on 2 CPU cores the demo's 32x32 images are "
                   "blurry; docs/demo.md says what the budget allows and what was tried.")


def print_summary(report: dict[str, Any], out: Path) -> None:
    def fmt(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    tok, gen = report["tokenizer"], report["generation"]
    print("\n=== D-AR demo summary ===")
    print(f"tokenizer      PSNR {fmt(tok['psnr'], 2)} dB   SSIM {fmt(tok['ssim'])}   rFID {fmt(tok['rfid'], 2)}")
    print(f"generation     FID {fmt(gen['fid'], 2)}   precision {fmt(gen['precision'])}   recall {fmt(gen['recall'])}"
          f"   ({gen['num_samples']} samples vs {gen['num_reference']} held-out images)")
    print(f"classes        consistency {fmt(report['class_consistency'])}"
          f"   (judge's accuracy on real held-out images: {fmt(report['classifier_heldout_accuracy'])};"
          f" on the tokenizer's reconstructions of them: {fmt(tok['class_consistency'])})")
    if report["quality"]:
        print(f"quality        {report['quality']}")
    print(f"took           {report['total_seconds_this_invocation']:.0f} s this invocation")
    print(f"outputs        {out}/{{reconstructions,samples,previews,layout}}.png, stream.gif, "
          "class_consistency.json, report.json")


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.demo ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
