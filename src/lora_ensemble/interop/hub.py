"""Checkpoint locations: a local folder, or a Hugging Face Hub model id resolved through `huggingface_hub`.

    resolve_checkpoint("runs/ens")               -> "runs/ens"                       (an existing folder)
    resolve_checkpoint("someone/lora-ensemble")  -> "~/.cache/huggingface/hub/..."  (downloaded, or cached when offline)
"""

from __future__ import annotations

import os

DEFAULT_PATTERNS = ("*.json", "*.safetensors")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when Hub access is switched off (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE, set to 1/on/yes/true)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None,
                       allow_patterns: list[str] | tuple[str, ...] | None = DEFAULT_PATTERNS,
                       cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> str:
    """The local folder of a checkpoint: `path_or_id` itself when it is a folder, else the snapshot of the Hub
    repository of that id (only files matching `allow_patterns`; from the local cache when offline).

    Raises NotADirectoryError for a file, FileNotFoundError for a path that is neither a folder nor a valid
    Hub id, and OSError (naming the id and the reason) when the Hub cannot provide it.
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a folder path or a Hub model id, got {type(path_or_id).__name__}")
    path = os.path.expanduser(os.fspath(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{path} is a file; a checkpoint is a folder (or a Hugging Face Hub model id)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise FileNotFoundError(
            f"no folder {path!r}; to load it as a Hub model id install huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        validate_repo_id(path)
    except Exception:
        raise FileNotFoundError(f"no folder {path!r}, and it is not a valid Hugging Face Hub model id either") from None
    offline = hub_offline()
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline,
                                 allow_patterns=list(allow_patterns) if allow_patterns else None)
    except Exception as e:
        if offline:
            raise OSError(
                f"{path!r} is not a local folder, and Hub access is off (HF_HUB_OFFLINE=1) with no cached copy of that "
                f"model id; download it while online (huggingface-cli download {path}) or pass a local folder"
            ) from None
        raise OSError(
            f"{path!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); check the model id, the revision, your network and token"
        ) from e
