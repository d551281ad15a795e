"""Resolve a weights file from a local path or a Hugging Face hub repository, and the loss-network cache.

A local file or folder always wins. Otherwise ``path_or_repo_id`` is a hub repo id and the file is
fetched through ``huggingface_hub`` (which honours ``HF_HOME``, its cache and ``HF_HUB_OFFLINE``).
When the network is unreachable and nothing is cached, the error says exactly what to download and
where to put it instead of a stack of HTTP errors.

The frozen networks of training losses and evaluation (VGG16 + LPIPS heads, DINOv2 for REPA, the
Inception classifier for IS) live in ONE folder, :func:`cache_dir`: ``$DAR_CACHE`` when set, else the
torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``), where torchvision, pytorch-fid and the official D-AR code put the
same files. :func:`fetch_url` and :func:`fetch_hub_file` fetch a missing file into it (trainers call
them on local rank 0 of each node first, ``utils.distributed.local_rank_zero_first``); with
``HF_HUB_OFFLINE=1`` nothing is fetched and the error names the file, the folder and the command.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.errors import UserError

OFFICIAL_REPO_ID = "showlab/D-AR"
_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".yaml"}


class UsageError(UserError, ValueError):
    """A path and a file name that do not go together (a file plus a file name, a folder without one)."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """The requested weights are neither local nor reachable on the hub."""


def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str | None = None,
    default_filename: str | None = None,
) -> Path:
    """Return a local path for ``filename`` in a folder / hub repo, or ``path_or_repo_id`` itself if a file."""
    from utils.checkpoint import follow_pointer  # torch-heavy; only needed for local paths

    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        path = follow_pointer(path)
    if path.is_file():
        if filename is not None:
            raise UsageError(f"{path} is a file; do not also pass a file name inside it ({filename!r})")
        return path
    name = filename or default_filename
    if path.is_dir():
        if name is None:
            raise UsageError(f"{path} is a folder; pass the file inside it to use")
        candidate = path / name
        if not candidate.is_file():
            raise WeightsNotFoundError(f"{candidate} does not exist; pass the file itself or a folder that holds {name}")
        return candidate
    repo_id = str(path_or_repo_id)
    # "runs/final" with an existing "runs/" folder is a local path that is missing, not a hub repo id.
    looks_like_repo = (repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))
                       and not path.parent.is_dir() and path.suffix not in _FILE_SUFFIXES)
    if not looks_like_repo:
        raise WeightsNotFoundError(f"{repo_id} does not exist (nor is it a hub repo id such as {OFFICIAL_REPO_ID})")
    if name is None:
        raise WeightsNotFoundError(f"{repo_id} does not exist locally; to fetch it from the hub as a repo id, "
                                   "also name the file inside it")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:  # pragma: no cover - huggingface_hub is a requirement
        raise WeightsNotFoundError("huggingface_hub is not installed; pass a local path instead") from error
    try:
        # huggingface_hub reads HF_HUB_OFFLINE once, at its import: asking again here honours a value set
        # later in the process (a notebook, a test) instead of trying the network and timing out.
        return Path(hf_hub_download(repo_id=repo_id, filename=name, local_files_only=is_offline()))
    except Exception as error:  # the hub raises many network/cache error types; all mean "not available"
        raise WeightsNotFoundError(
            f"could not get {name!r} from the hub repo {repo_id!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); if this machine is offline, run "
            f"`{hf_download_command(repo_id, name)}` on one with internet and pass the file's path, "
            "or copy the hub cache over and set HF_HUB_OFFLINE=1"
        ) from error


def hf_download_command(repo_id: str, filename: str, local_dir: str | None = None) -> str:
    """The ``hf`` command (huggingface_hub >= 0.34) that fetches one file of a hub repo."""
    target = f" --local-dir {local_dir}" if local_dir else ""
    return f"hf download {repo_id} {filename}{target}"


CACHE_ENV = "DAR_CACHE"


def cache_dir() -> Path:
    """The folder loss and evaluation networks are fetched into and read from (see the module docstring)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    import torch  # only here: this module stays importable without torch's start-up cost

    return Path(torch.hub.get_dir()) / "checkpoints"


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` set (1 / true / yes / on): the project's one switch for "never download"."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_url(url: str, filename: str, sha256: str | None, what: str, fix: str) -> Path:
    """``cache_dir() / filename``, downloaded from ``url`` (hash-checked against ``sha256``) when absent.

    Offline or unreachable: :class:`WeightsNotFoundError`, one line naming the file, where to put it
    and ``fix`` (e.g. the flag that turns the term off).
    """
    target = cache_dir() / filename
    if target.is_file():
        return target
    advice = (f"download {url} on a machine with internet (`curl -L -o {target} {url}`) and put it at {target} "
              f"(the cache folder, ${CACHE_ENV} to move it), {fix}")
    if is_offline():
        raise WeightsNotFoundError(f"{what} ({filename}) are not in {target.parent} and HF_HUB_OFFLINE is set: {advice}")
    target.parent.mkdir(parents=True, exist_ok=True)
    import torch

    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=False)
    except Exception as error:  # urllib/ssl/socket/hash errors all mean "not available here"
        detail = str(error).splitlines()[0] if str(error) else ""
        raise WeightsNotFoundError(f"{what} ({filename}) are not in {target.parent} and could not be downloaded "
                                   f"({type(error).__name__}: {detail}): {advice}") from error
    return target


def fetch_hub_file(repo_id: str, filename: str, what: str, fix: str) -> Path:
    """``cache_dir() / <owner>--<name> / filename``, fetched from the hub repo when absent.

    A copy already in the Hugging Face cache is used as it is. Offline or unreachable:
    :class:`WeightsNotFoundError` with the ``hf download ... --local-dir`` command that fills the cache.
    """
    folder = cache_dir() / repo_id.replace("/", "--")
    target = folder / filename
    if target.is_file():
        return target
    import huggingface_hub  # the module, so tests can replace its functions

    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    advice = (f"run `{hf_download_command(repo_id, filename, local_dir=str(folder))}` on a machine with internet "
              f"and copy {folder} here (${CACHE_ENV} moves the cache folder), {fix}")
    if is_offline():
        raise WeightsNotFoundError(f"{what} ({filename} of {repo_id}) are not in {folder} and HF_HUB_OFFLINE is set: "
                                   f"{advice}")
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, local_dir=folder))
    except Exception as error:  # the hub raises many network/cache error types; all mean "not available"
        detail = str(error).splitlines()[0] if str(error) else ""
        raise WeightsNotFoundError(f"{what} ({filename} of {repo_id}) are not in {folder} and could not be fetched "
                                   f"({type(error).__name__}: {detail}); {advice}") from error
