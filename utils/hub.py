"""Resolve a weights file from a local path or a Hugging Face hub repository.

A local file or folder always wins. Otherwise ``path_or_repo_id`` is a hub repo id and the file is
fetched through ``huggingface_hub`` (which honours ``HF_HOME``, its cache and ``HF_HUB_OFFLINE``).
When the network is unreachable and nothing is cached, the error says exactly what to download and
where to put it instead of a stack of HTTP errors.
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
        return Path(hf_hub_download(repo_id=repo_id, filename=name))
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
