"""Find the model directory: a local path as is, or a Hugging Face Hub id downloaded once."""

from __future__ import annotations

import os
import re
from pathlib import Path

from auto_glm.loader.errors import ModelLoadError

__all__ = ["hub_allow_patterns", "resolve_model_path"]

# owner/name, as the Hub spells repository ids; anything else is treated as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_EXAMPLE_ID = "THUDM/glm-4-9b-chat-hf"


def hub_allow_patterns(allow_pickle: bool) -> list[str]:
    """Files worth downloading: configs, tokenizers and weights, never Python code."""
    patterns = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
    return patterns + ["*.bin"] if allow_pickle else patterns


def resolve_model_path(
    model: str | os.PathLike[str], revision: str | None = None, allow_pickle: bool = False
) -> Path:
    """The local directory of ``model`` (a directory, or an ``owner/name`` Hub id)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelLoadError(
            f"{path} is a file; pass the model directory that contains config.json"
        )
    text = os.fspath(model)
    if not _HUB_ID.match(text):
        raise ModelLoadError(
            f"model directory {path} does not exist; pass an existing Hugging Face model "
            f"directory or a hub id such as {_EXAMPLE_ID}"
        )
    return _download(text, revision, allow_pickle)


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    # Imported here: huggingface_hub reads HF_HUB_OFFLINE at import time, and local
    # directories never need it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"could not fetch {repo_id!r} from the Hugging Face Hub"
    local = "download it on a connected machine and pass the local directory"
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=hub_allow_patterns(allow_pickle)
            )
        )
    except LocalEntryNotFoundError as exc:
        if _hub_offline():
            raise ModelLoadError(f"{where} (offline: HF_HUB_OFFLINE=1); {local}") from exc
        raise ModelLoadError(
            f"{where} (no connection to the Hub and no cached copy); check the network, or {local}"
        ) from exc
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"{where}: the repository is gated; accept its licence on huggingface.co and "
            "log in with `hf auth login` (or set HF_TOKEN)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"{where}: no such repository, and {repo_id!r} is not a local directory either; "
            f"check the spelling (e.g. {_EXAMPLE_ID}) or pass a local directory"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelLoadError(
            f"{where}: revision {revision!r} does not exist; pass an existing branch, tag or commit"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"{where} ({exc}); retry later, or {local}") from exc
