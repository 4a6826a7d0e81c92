"""Opening a user's file: regular files only, decided on the opened descriptor, and bounded in size.

Every image and data file halp reads for a user (tables, images, benchmark sources, manifests, the review page's
images) is opened here. A FIFO, a device, a socket or a directory named like a file is refused before a byte is
read: the file is opened with O_NONBLOCK, so opening a FIFO never waits for a writer, and then the descriptor's
own `fstat` decides, so a file swapped for something else after a check on its name cannot get around it. A file
read whole into memory (an image, a JSON file) is bounded: at most `limit` bytes are ever read, also from a file
that grows while it is read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from halp.errors import HalpError, UserFileError

#: The most bytes halp reads whole into memory from one user file (an image, a JSON annotation or manifest): far
#: above any image PIL decodes under its decompression-bomb limit, far below what exhausts a machine's memory.
READ_LIMIT = 1 << 30

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(mode: int) -> str:
    """What a file that is not regular is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_user_file(
    path: str | Path, what: str = "file", limit: int | None = None, error: type[HalpError] = UserFileError
) -> BinaryIO:
    """`path` opened for reading in binary, if it is a regular file (of at most `limit` bytes); otherwise `error`
    saying what it is. `what` names the file in the message ("image file", "input table")."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as err:
        raise error(f"{what} {path} does not exist") from err
    except (OSError, ValueError) as err:  # a socket (ENXIO), permission, a name too long, a NUL byte, a loop ...
        mode = stat.S_IFREG
        with contextlib.suppress(OSError, ValueError):
            mode = os.stat(path).st_mode  # stat never blocks: only to say what the file is
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {kind_of(mode)}, not a regular file; halp reads only regular files") from err
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        if isinstance(err, ValueError) or err.errno == errno.ENAMETOOLONG:  # a NUL byte, a name past NAME_MAX
            raise error(f"{what} {str(path)!r} is not a usable file name: {reason}") from err
        raise error(f"{what} {path} cannot be opened: {reason}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is {kind_of(info.st_mode)}, not a regular file; halp reads only regular files")
        if limit is not None and info.st_size > limit:
            raise error(f"{what} {path} is {info.st_size} bytes, more than the {limit} bytes halp reads of one file")
        if hasattr(os, "O_NONBLOCK"):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_user_file(
    path: str | Path, what: str = "file", limit: int = READ_LIMIT, error: type[HalpError] = UserFileError
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`open_user_file`); a read error is `error` too."""
    with open_user_file(path, what, limit, error) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as err:
            raise error(f"{what} {path} cannot be read: {err.strerror or err}") from err
    if len(data) > limit:
        raise error(f"{what} {path} grew past the {limit} bytes halp reads of one file while it was read")
    return data


def check_user_file(path: str | Path, what: str = "file", error: type[HalpError] = UserFileError) -> None:
    """Refuse `path` unless it is a regular file, for readers that must open it by name themselves (the `datasets`
    memory map): the check is made on an opened descriptor, but their own open comes after it."""
    open_user_file(path, what, None, error).close()
