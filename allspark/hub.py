"""A checkpoint on the Hugging Face Hub: publishing it (``allspark export --push-to-hub REPO_ID``,
:meth:`allspark.AllSpark.push_to_hub`) and loading it back (``AllSpark.from_pretrained("namespace/name")``,
``allspark predict --checkpoint namespace/name``, ``evaluate.py --checkpoint namespace/name``).

A folder is pushed as it is, through ``huggingface_hub.create_repo(repo_id, exist_ok=True)`` and
``huggingface_hub.upload_folder`` (one commit). The token is huggingface_hub's own (``HF_TOKEN`` or
``hf auth login``) unless one is given. Nothing is uploaded by any other command. A missing package, a malformed
repo id and a failed upload (no network, no permission, no token) are one clear :class:`~allspark.errors.UserError`
each (exit status 2 from the command line).

Downloading: :func:`resolve_pretrained` turns what the caller named into a local folder. An existing local path is
used as it is (no network, whatever it looks like). Anything else that has the form of a Hub model id,
``namespace/name`` or ``namespace/name@revision`` (a branch, tag or commit), is downloaded with
``huggingface_hub.snapshot_download`` into huggingface_hub's cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses only what
is cached there); nothing is downloaded that the caller did not name. A path that neither exists nor has that
form is a :class:`~allspark.errors.UserFileNotFoundError`; a failed download (no network, no such repository or
revision, a private repository without a token) is one :class:`HubError` that also says there is no local folder
of that name.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from allspark.errors import MissingPackageError, UserError, UserFileNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["HubError", "hub_module", "check_repo_id", "push_folder", "parse_hub_id", "hub_checkpoint_id",
           "download_checkpoint", "resolve_pretrained"]

#: one part of a Hub repository id (huggingface_hub's rules: letters, digits, '-', '_', '.'; starts and ends with a
#: letter, digit or '_'; at most 96 characters; no '--' or '..')
_ID_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_ID_PART}/{_ID_PART})(?:@(?P<revision>[^\s@]+))?")


class HubError(UserError):
    """An upload to the Hugging Face Hub failed."""


def hub_module(purpose: str = "pushing to the Hugging Face Hub") -> Any:
    """``huggingface_hub``, or a :class:`MissingPackageError` saying how to install it (and what needs it)."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise MissingPackageError(f"{purpose} needs the huggingface_hub package, which is not "
                                  "installed: run `pip install huggingface_hub`") from exc
    return huggingface_hub


def _failures(hub: Any) -> tuple[type[BaseException], ...]:
    """The exceptions a Hub call raises for a problem outside this program: HfHubHTTPError and a missing token
    (OSError), no connection (httpx's errors in huggingface_hub >= 1.0), an entry missing from the Hub or the
    cache."""
    failures: tuple[type[BaseException], ...] = (OSError,)
    errors = getattr(hub, "errors", None)
    for name in ("HTTPError", "EntryNotFoundError"):
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            failures += (kind,)
    return failures


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
    failures = _failures(hub)
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


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``text`` has the form of a Hub model id, ``namespace/name`` or
    ``namespace/name@revision``; None otherwise (a path: ``./x``, ``/x``, ``~/x``, ``a/b/c``, a name with spaces)."""
    match = _HUB_ID.fullmatch(text) if isinstance(text, str) else None
    if match is None or ".." in match["repo"] or "--" in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_checkpoint_id(location: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``location`` names a Hub checkpoint: no local path of that name exists and it
    has the form of a Hub id (:func:`parse_hub_id`); None for a local path (existing or not)."""
    text = str(location)
    if Path(text).expanduser().exists():
        return None
    return parse_hub_id(text)


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of the Hub model repository ``repo_id`` at ``revision`` (default: its main branch), fetched
    with ``huggingface_hub.snapshot_download`` (files already in huggingface_hub's cache are not fetched again)."""
    hub = hub_module(f"loading the checkpoint {repo_id!r} from the Hugging Face Hub")
    from allspark import __version__

    named = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, library_name="allspark",
                                       library_version=__version__)
    except _failures(hub) as exc:
        raise HubError(
            f"{named}: no local folder of that name, and downloading it as a Hugging Face Hub model repository "
            f"failed: {type(exc).__name__}: {exc} (no network, no such repository or revision, or a private "
            "repository without a token from HF_TOKEN or `hf auth login`; for a local folder, check the path, "
            "e.g. write it as ./" + named + ")") from exc
    logger.info("%s: downloaded from the Hugging Face Hub to %s", named, folder)
    return Path(folder)


def resolve_pretrained(location: str | Path, *, revision: str | None = None) -> tuple[Path, str | None]:
    """What a caller named as a checkpoint, as ``(local folder, Hub id or None)``: an existing local path as it is
    (never a download), else a Hub id ``namespace/name[@revision]`` downloaded (:func:`download_checkpoint`; the
    returned id carries the revision). ``revision``: the same as ``@revision`` (both given must agree). A path that
    neither exists nor has the form of a Hub id is a :class:`UserFileNotFoundError`."""
    from allspark.config import ConfigError

    text = str(location)
    local = Path(text).expanduser()
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ConfigError(f"revision: expected a Hub branch, tag or commit, got {revision!r}")
    parsed = hub_checkpoint_id(text)
    if parsed is None:
        if local.exists() and revision is None:
            return local, None
        if local.exists():
            raise ConfigError(f"revision={revision!r} applies to a Hugging Face Hub id; {text} is a local folder")
        raise UserFileNotFoundError(
            f"checkpoint {text} does not exist: expected a local folder (written by save_pretrained, or a train.py "
            "run folder) or a Hugging Face Hub model id 'namespace/name' or 'namespace/name@revision'")
    repo_id, named_revision = parsed
    if revision is not None and named_revision is not None and revision != named_revision:
        raise ConfigError(f"{text} names revision {named_revision!r}, but revision={revision!r} was passed too")
    revision = named_revision or revision
    return download_checkpoint(repo_id, revision), repo_id if revision is None else f"{repo_id}@{revision}"
