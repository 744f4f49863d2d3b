"""Writing an output file whole or not at all: a temporary file in the same folder, then ``os.replace``.

A full disk, a missing folder or a path that is a directory end in one clear error and leave no partial
file (neither the output nor the temporary file) behind. The file gets the mode any new file gets
(``0o666 & ~umask``), not the private ``0o600`` of the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from bsprof.errors import BadInput, BsprofError

__all__ = ["WriteFailed", "check_output_path", "new_file_mode", "write_atomic"]

_umask_lock = threading.Lock()


class WriteFailed(BsprofError):
    """The file system refused to take the output (disk full, I/O error): exit code 1."""

    exit_code = 1


def check_output_path(out: str | Path, what: str, *, create_parent: bool = False) -> Path:
    """``out`` as a path, refused when it is a directory or its folder is missing (unless ``create_parent``).

    Raises:
        BadInput: The path is a directory, or its folder does not exist.
    """
    path = Path(out)
    if path.is_dir():
        raise BadInput(f"{what} {path} is a directory; give a file name inside it")
    if not create_parent and not path.parent.is_dir():
        raise BadInput(f"{what} {path}: folder {path.parent} does not exist")
    return path


def new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: ``0o666`` less the process's umask."""
    with _umask_lock:  # reading the umask means setting it: restore it at once, one thread at a time
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_atomic(out: str | Path, write: Callable[[Path], None], what: str, *, create_parent: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``out``, then move it onto ``out``.

    Args:
        out: The file to produce.
        write: Writes the whole content to the path it is given.
        what: How the output is named in errors (``"--output"``, ``"report"``).
        create_parent: Create ``out``'s folder when missing (else a missing folder is bad input).

    Raises:
        BadInput: ``out`` is a directory, or its folder is missing or not writable.
        WriteFailed: Writing failed part-way (no space left, I/O error); nothing is left behind.
    """
    path = check_output_path(out, what, create_parent=create_parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise BadInput(f"cannot write {what} {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise BadInput(f"cannot write {what} {path}: {reason}") from None
        raise WriteFailed(f"cannot write {what} {path}: {reason}; nothing was written") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
