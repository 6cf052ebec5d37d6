"""Publishing a checkpoint on the Hugging Face Hub: ``allspark export --push-to-hub REPO_ID`` and
:meth:`allspark.AllSpark.push_to_hub`.

A folder is pushed as it is, through ``huggingface_hub.create_repo(repo_id, exist_ok=True)`` and
``huggingface_hub.upload_folder`` (one commit). The token is huggingface_hub's own (``HF_TOKEN`` or
``hf auth login``) unless one is given. Nothing is uploaded by any other command. A missing package, a malformed
repo id and a failed upload (no network, no permission, no token) are one clear :class:`~allspark.errors.UserError`
each (exit status 2 from the command line).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from allspark.errors import MissingPackageError, UserError, UserFileNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["HubError", "hub_module", "check_repo_id", "push_folder"]


class HubError(UserError):
    """An upload to the Hugging Face Hub failed."""


def hub_module() -> Any:
    """``huggingface_hub``, or a :class:`MissingPackageError` saying how to install it."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise MissingPackageError("pushing to the Hugging Face Hub needs the huggingface_hub package, which is not "
                                  "installed: run `pip install huggingface_hub`") from exc
    return huggingface_hub


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid Hub model repository id (``name`` or ``namespace/name``), else a
    :class:`UserError` naming what was expected and what was found."""
    hub_module()  # the package, or how to install it
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or not repo_id:
            raise HFValidationError("empty")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"--push-to-hub: expected a Hub repository id 'name' or 'namespace/name' (letters, digits, "
                        f"'-', '_', '.'), got {repo_id!r}") from None
    return repo_id


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload every file of ``folder`` to the Hub model repository ``repo_id`` (created if it does not exist;
    ``private`` only applies then) in one commit; returns the commit's URL."""
    hub = hub_module()
    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserFileNotFoundError(f"{folder}: expected a folder of files to push to the Hub, found "
                                    + ("an empty folder" if folder.is_dir() else "nothing"))
    failures: tuple[type[BaseException], ...] = (OSError,)  # HfHubHTTPError, a missing token, requests' errors
    http = getattr(getattr(hub, "errors", None), "HTTPError", None)  # httpx's errors (no connection) in hub >= 1.0
    if isinstance(http, type) and issubclass(http, BaseException):
        failures += (http,)
    message = commit_message or f"Upload AllSpark checkpoint {folder.name}"
    try:
        hub.create_repo(repo_id, token=token, private=private, exist_ok=True)
        commit = hub.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, token=token,
                                   revision=revision)
    except failures as exc:
        raise HubError(f"pushing {folder} to the Hugging Face Hub repository {repo_id!r} failed: "
                       f"{type(exc).__name__}: {exc} (a token comes from HF_TOKEN or `hf auth login`)") from exc
    url = str(getattr(commit, "commit_url", None) or getattr(commit, "repo_url", None) or commit)
    logger.info("pushed %s to %s", folder, url)
    return url
