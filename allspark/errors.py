"""The one error type for problems the user causes, and the rule the command line applies to it.

``UserError`` marks a problem in what the user gave: a config key or value, a data file, a checkpoint path, a
component name. The command line (:func:`allspark.cli.run_cli`) prints such an error as one ``error: ...`` line and
exits with status 2. Every other exception is a bug (or an environment failure) and keeps its traceback (exit 1),
so a bug never looks like a user mistake. The subclasses keep the built-in base their callers already catch:
``ConfigError(UserError, ValueError)``, ``DatasetFormatError(UserError, ValueError)``,
``RegistryError(UserError, KeyError)``, ``UserFileNotFoundError(UserError, FileNotFoundError)``.

Raise a ``UserError`` (or a subclass) only where the message names what was expected and what was found, and
the file or config key it concerns.
"""
from __future__ import annotations

import errno

__all__ = ["UserError", "UserFileNotFoundError", "MissingPackageError", "is_user_os_error"]


class UserError(Exception):
    """A problem in the user's input (config, data, paths, names): one clear message, no traceback."""

    def __str__(self) -> str:  # a KeyError subclass would quote its message; keep it readable
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or does not hold what was expected there."""


class MissingPackageError(UserError, ImportError):
    """An optional package the user's config asks for is not installed; the message says how to install it."""


#: OS errors that come from the paths and disks the user chose, not from a bug
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def is_user_os_error(exc: BaseException) -> bool:
    """True for the OS errors a user causes: a missing path, no permission, a file where a folder belongs (or
    the reverse), a full disk or quota, a read-only file system."""
    if isinstance(exc, _USER_OS_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno in _USER_ERRNOS
