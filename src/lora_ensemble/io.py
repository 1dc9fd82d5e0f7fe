"""Files: atomic writes, checkpoint locations (a folder or a Hugging Face Hub id), safetensors reads and the
fingerprint of a base model. Nothing here knows an ensemble.

    atomic_write(path) / atomic_write_bytes(path, data)   temporary file in the same folder, then a rename
    resolve_checkpoint("runs/ens")               -> "runs/ens"                       (an existing folder)
    resolve_checkpoint("someone/lora-ensemble")  -> "~/.cache/huggingface/hub/..."  (downloaded, or cached when offline)
    fingerprint(model) / check_fingerprint(expected, actual, source)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from typing import IO, Any

from safetensors.torch import load as safetensors_load
from torch import Tensor, nn

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


# ---- atomic writes --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file in `path`'s folder for writing; on a clean exit it is flushed to disk and
    renamed to `path`, on an exception it is deleted. A crash never leaves a half-written `path`, and
    readers see either the old file or the new one.

        with atomic_write("results.json", "w", encoding="utf-8") as f:
            json.dump(results, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), got mode={mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data (a node that dies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


# ---- fingerprint and checkpoint files --------------------------------------------------------------
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of a base model: class, parameter count and a hash of every state tensor's name and shape
    (the architecture), plus a hash of a small sample of the weights (which checkpoint)."""
    state = model.state_dict()
    shapes = [[n, list(t.shape)] for n, t in state.items()]
    sample = hashlib.sha256()
    for n, t in state.items():
        if t.is_floating_point() and t.numel():
            head = t.detach().flatten()[:16].float().cpu().round(decimals=3).tolist()
            sample.update(struct.pack(f"<{len(head)}f", *head))  # float32 bytes, as numpy's tobytes() wrote them
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "weights_sample_sha256": sample.hexdigest(),
    }


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], source: Any) -> None:
    """ValueError when `actual` is another architecture than `expected`; a warning for other weights."""
    if expected.get("class") != actual["class"] or expected.get("shapes_sha256") != actual["shapes_sha256"]:
        raise ValueError(
            f"the checkpoint {os.fspath(source)!r} was saved for base model {expected.get('class')} with "
            f"{expected.get('num_parameters')} parameters, but the model given is {actual['class']} with "
            f"{actual['num_parameters']} parameters (class or parameter shapes differ); load it onto the base "
            "model it was trained on"
        )
    if expected.get("weights_sample_sha256") not in (None, actual["weights_sample_sha256"]):
        warnings.warn(
            f"the base model's weights differ from those {os.fspath(source)!r} was trained on (same architecture); "
            "outputs will differ from the saved ensemble's",
            stacklevel=3,
        )


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)} not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return safetensors_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{os.fspath(path)} is not a readable safetensors file ({e})") from None
