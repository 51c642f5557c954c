"""Writing files so that a crash, a full disk or a reader at the same moment never sees half a file."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

from mtrain.errors import MtrainError


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power cut can undo the rename."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems cannot open directories; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_names(names: list[str], n: int = 3) -> str:
    """'a, b, c, ...': the first `n` of a list of file names, for a one-line error."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_folder(path: Path | str, what: str) -> None:
    """One line, before any work, when folder `path` (which need not exist yet) cannot be one: a file
    is in the way, here or above, or the nearest existing folder above is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MtrainError(f"{path}: is a file, not a folder (for the {what})")
    above = path
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise MtrainError(f"{path}: cannot be created (for the {what}): {above} is a file")
    if not os.access(above, os.W_OK | os.X_OK):
        raise MtrainError(f"{path}: cannot be created (for the {what}): {above} is not writable")


def make_folder(path: Path | str, what: str) -> None:
    """mkdir -p, with the system's reason in one line where it fails (a read-only or special file system)."""
    check_folder(path, what)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MtrainError(f"{path}: cannot be created (for the {what}): {e.strerror or type(e).__name__}") from None


def check_parent(path: Path, what: str = "output", folder: bool = False) -> None:
    """One line naming the directory, before any work, when `path` cannot be created there, or (for
    a file output, `folder` False) when a folder of that name is in the way."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise MtrainError(f"{parent}: directory for the {what} {Path(path).name} does not exist")
    if not folder and Path(path).is_dir():
        raise MtrainError(f"{path}: is a folder; the {what} is a file, give its name")


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "wb", what: str = "file") -> Iterator[IO]:
    """Write to a hidden temporary file beside `path`, fsync, then rename over `path`: readers and
    crashes see the old file or the new one, never a part. On any error the temporary file is removed,
    the old file stays, and a write error (a full disk) becomes one line naming the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MtrainError(f"{path.parent}: cannot write the {what} {path.name} "
                              f"({e.strerror or e}); the previous {path.name}, if any, is intact") from None
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_text(path: Path | str, what: str = "output") -> Iterator[IO[str]]:
    """atomic_write of UTF-8 text, gzip-compressed when the name ends in .gz, as such inputs are read."""
    if Path(path).suffix != ".gz":
        with atomic_write(path, "w", what) as f:
            yield f
        return
    with atomic_write(path, "wb", what) as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as z, io.TextIOWrapper(z, "utf-8") as f:
            yield f


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (a hard link, no second copy), atomically; on file
    systems without hard links (some network and FUSE mounts) an atomic copy instead."""
    tmp = target.with_name(f".{target.name}.link{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        with atomic_write(target, "wb", "checkpoint") as out, open(source, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        return
    fsync_dir(target.parent)
