"""Loss and evaluation networks: one cache folder, fetched once per node, a one-line offline error."""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tokenizer.lpips as lpips_module
from evaluations.inception import cached_is_weights
from tokenizer.losses import REPA_ENCODER_PRESETS, LossConfig, RepaFeatureExtractor, WeightFiles, build_loss_networks
from utils.distributed import DistEnv
from utils.hub import WeightsNotFoundError, cache_dir

DINOV2 = REPA_ENCODER_PRESETS["dinov2_vitb14"]


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """$DAR_CACHE is an empty folder, HF_HUB_OFFLINE=1, and no copy in the Hugging Face cache or the lpips package."""
    import huggingface_hub

    cache = tmp_path / "dar-cache"
    monkeypatch.setenv("DAR_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(lpips_module, "_bundled_lpips_head", lambda: None)
    return cache


def test_every_network_uses_the_one_cache_folder(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == empty_cache and cached_is_weights().parent == empty_cache
    monkeypatch.delenv("DAR_CACHE")
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"  # the default: torch hub's checkpoints


def test_offline_errors_name_the_files_and_the_hf_download_command(empty_cache: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as error:
        RepaFeatureExtractor(DINOV2, pretrained=True)
    message = str(error.value)
    folder = empty_cache / "timm--vit_base_patch14_dinov2.lvd142m"
    assert "\n" not in message and "huggingface-cli" not in message
    assert f"`hf download timm/vit_base_patch14_dinov2.lvd142m model.safetensors --local-dir {folder}`" in message
    assert "dinov2_vitb14_pretrain.pth" in message and "--repa-weight 0" in message
    with pytest.raises(WeightsNotFoundError) as error:
        lpips_module.LPIPS(pretrained=True)
    message = str(error.value)
    assert "\n" not in message and lpips_module.VGG16_FILENAME in message and str(empty_cache) in message
    assert "--perceptual-weight 0" in message
    # The trainer's wrapper stays one line and names its flags.
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(WeightsNotFoundError) as error:
        build_loss_networks(LossConfig(perceptual_weight=0.0, repa_weight=0.5), WeightFiles(), env, logging.getLogger())
    assert "\n" not in str(error.value) and "--dinov2-weights" in str(error.value)


def _rank(rank: int, world: int, store: str, caches: list[str], calls: str, sources: dict[str, str]) -> None:
    """One rank of two simulated nodes (two ranks each, a cache folder each); downloads are logged and slow."""
    os.environ.update(LOCAL_RANK=str(rank % 2), DAR_CACHE=caches[rank // 2])
    os.environ.pop("HF_HUB_OFFLINE", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        (Path(calls) / f"rank{rank}-{Path(dst).name}").touch()
        time.sleep(1.0)  # a rank that did not wait for its node's local rank 0 would find the cache empty
        shutil.copy(sources[Path(dst).name], dst)

    torch.hub.download_url_to_file = download
    lpips_module._bundled_lpips_head = lambda: None
    try:
        env = DistEnv(rank, world, rank % 2, torch.device("cpu"))
        nets = build_loss_networks(LossConfig(perceptual_weight=0.5, repa_weight=0.0), WeightFiles(), env,
                                   logging.getLogger("test"))
        assert nets.lpips is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_loss_networks_are_fetched_once_per_node(tmp_path: Path) -> None:
    source = lpips_module.LPIPS(pretrained=False)
    sources = {lpips_module.VGG16_FILENAME: str(tmp_path / "vgg.pth"),
               lpips_module.LPIPS_HEAD_FILENAME: str(tmp_path / "head.pth")}
    torch.save(source.backbone_state_dict(), sources[lpips_module.VGG16_FILENAME])
    torch.save(source.head_state_dict(), sources[lpips_module.LPIPS_HEAD_FILENAME])
    calls = tmp_path / "calls"
    calls.mkdir()
    caches = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    mp.start_processes(_rank, args=(4, str(tmp_path / "store"), caches, str(calls), sources), nprocs=4,
                       start_method="spawn")
    files = (lpips_module.VGG16_FILENAME, lpips_module.LPIPS_HEAD_FILENAME)
    # Local rank 0 of each node fetched each file once; the node's other rank read its cache.
    assert sorted(p.name for p in calls.iterdir()) == sorted(f"rank{r}-{f}" for r in (0, 2) for f in files)
    for cache in caches:
        assert sorted(p.name for p in Path(cache).iterdir()) == sorted(files)
