"""User-facing errors: the CLI prints them as one line and exits with status 2.

Besides :class:`HGFError`, the CLI reports as one line the operating-system errors a user causes
and can fix (a full disk, a read-only or forbidden folder, a file where a folder is expected, a
missing path): :func:`io_error_message` says which. safetensors and tokenizers write through Rust
and raise their own exception types for these, with the errno only in the message
(``... (os error 28)``); :func:`os_errno` reads it from there too.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

# errors of the user's files and disks, not of hgf: reported as one line, never as a traceback
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST,
                         errno.ENAMETOOLONG})
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class HGFError(Exception):
    """A problem with the user's input (config, data, checkpoint, file); message is one line."""


def os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of a library exception that wraps one (``(os error N)``)."""
    if isinstance(e, OSError):
        return e.errno
    m = _WRAPPED_OS_ERROR.search(str(e)) if isinstance(e, Exception) else None
    return int(m.group(1)) if m else None


def as_os_error(e: BaseException, path: str | Path, tmp: str | Path) -> BaseException:
    """``e`` as an OSError naming ``path`` when it is an I/O error without a path or about the
    temporary ``tmp`` (a file or folder) that was being written in ``path``'s place; any other
    exception is returned unchanged."""
    n = os_errno(e)
    name = getattr(e, "filename", None)
    if n is None or (name is not None and not str(name).startswith(str(tmp))):
        return e
    return OSError(n, os.strerror(n), str(path))  # the subclass follows errno (PermissionError, ...)


def io_error_message(e: BaseException) -> str | None:
    """``PATH: what went wrong`` for an error in USER_ERRNOS, None for any other exception."""
    n = os_errno(e)
    if n not in USER_ERRNOS:
        return None
    what = os.strerror(n)
    what = what[:1].lower() + what[1:]
    names = [str(f) for f in (getattr(e, "filename", None), getattr(e, "filename2", None))
             if f is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


def exit_code(command: Callable[[], int | None]) -> int:
    """Run a command's body and return its exit status: an :class:`HGFError` or a user's I/O error
    (:func:`io_error_message`) is one line ``hgf: error: ...`` on stderr and status 2, Ctrl-C is
    130; any other exception is a bug and propagates with its traceback. Shared by ``hgf`` and
    the ``python -m hgf.reproduce.*`` tools."""
    try:
        return int(command() or 0)
    except HGFError as e:
        print(f"hgf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hgf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk, a read-only folder, ...: one line, not a traceback
        msg = io_error_message(e)
        if msg is None:
            raise
        print(f"hgf: error: {msg}", file=sys.stderr)
        return 2
