"""Small file helpers shared by the whole kit: atomic writes (one file or a set of files committed together),
output locks, and hashing."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kit.errors import UserError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cannot_write(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}")


def _temp_beside(path: Path, suffix: str) -> str:
    """A new, empty temporary file beside ``path`` (hidden, same folder: the rename stays on one file system), with
    the permissions a new file gets (mkstemp makes 0600)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
    except OSError as e:
        raise _cannot_write(path, e) from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or an exception inside the block leaves no half-written ``path`` (and removes the temporary file). An
    ``OSError`` while writing (a full disk, no permission) is a :class:`UserError` ``cannot write PATH: REASON``.
    """
    with atomic_files() as files, files.open(path, mode) as f:
        yield f


class FileSet:
    """Files written together: each to a temporary beside its target, all renamed into place at the end.

    Use through :func:`atomic_files`. :meth:`open` writes a target through a file object; :meth:`temp` gives a
    temporary path for a writer that wants a path (it must write that path, e.g. ``save_checkpoint(model, tmp, ...)``).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Path]] = []  # (temporary, target), renamed in this order

    def temp(self, path: str | os.PathLike[str]) -> Path:
        """A temporary path beside ``path`` that becomes ``path`` at the commit (its suffix is kept: ``a.b`` ->
        ``.a.b.<random>.tmp.b``, for writers that check the suffix)."""
        path = Path(path)
        tmp = _temp_beside(path, suffix=".tmp" + path.suffix)
        self._pending.append((tmp, path))
        return Path(tmp)

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
        """Write ``path``'s content (renamed into place at the commit)."""
        path = Path(path)
        tmp = self.temp(path)
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _cannot_write(path, e) from e

    def _discard(self) -> None:
        for tmp, _ in self._pending:
            _unlink_quietly(tmp)
        self._pending.clear()

    def _commit(self) -> None:
        folders = set()
        for i, (tmp, path) in enumerate(self._pending):
            try:
                os.replace(tmp, path)
            except OSError as e:
                for rest, _ in self._pending[i:]:
                    _unlink_quietly(rest)
                self._pending.clear()
                raise _cannot_write(path, e) from e
            folders.add(path.parent)
        self._pending.clear()
        for folder in folders:  # make the renames durable (POSIX; elsewhere a no-op)
            with contextlib.suppress(OSError, AttributeError):
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


@contextlib.contextmanager
def atomic_files() -> Iterator[FileSet]:
    """Commit several files together or not at all.

    Every file of the block is written to a temporary beside its target; when the block completes, they are renamed
    into place in the order they were begun (put the file whose presence says "complete" last). An exception in the
    block (a full disk while writing the third file) removes every temporary and leaves the previous files as they
    were. An ``OSError`` is a :class:`UserError` ``cannot write PATH: REASON``.
    """
    files = FileSet()
    try:
        yield files
    except BaseException:
        files._discard()
        raise
    files._commit()


# -------------------------------------------------------------------------------------------------------- locks
LOCK_NAME = ".otkit.lock"


def _holder_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder")


def _describe_holder(lock: Path) -> str:
    try:
        rec = json.loads(_holder_path(lock).read_text())
        since = _dt.datetime.fromisoformat(rec["started"]).astimezone()
        when = since.strftime("%H:%M:%S" if since.date() == _dt.date.today() else "%Y-%m-%d %H:%M:%S")
        return f" (pid {int(rec['pid'])}, {json.dumps(str(rec['command']))}, since {when})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its record yet, or it is odd
        return ""


def _command_line() -> str:
    return shlex.join(["otkit", *sys.argv[1:]])


@contextlib.contextmanager
def _locked(lock: Path, shown: Path, option: str, command: str | None) -> Iterator[Path]:
    """Hold ``lock`` (a :class:`filelock.FileLock`, timeout 0) with a holder record beside it; both are removed
    when the block ends, so a lock file exists only while its process works."""
    from filelock import FileLock, Timeout

    for _ in range(3):
        flock = FileLock(str(lock), timeout=0)
        try:
            flock.acquire()
        except Timeout:
            raise UserError(f"{shown} is in use by another otkit process{_describe_holder(lock)}; wait for it or "
                            f"choose another {option}") from None
        except OSError as e:
            raise UserError(f"cannot lock {shown}: {e.strerror or e}") from e
        if lock.exists():
            break
        flock.release()  # won the file its last holder was removing as it finished: take the new one
    else:
        raise UserError(f"cannot lock {shown}: its lock file {lock} keeps disappearing")
    holder = _holder_path(lock)
    try:
        record = {"pid": os.getpid(), "command": command if command is not None else _command_line(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        with contextlib.suppress(OSError, UserError):  # the record is a courtesy to the next process; not essential
            with atomic_write(holder, "w") as f:
                json.dump(record, f)
        yield shown
    finally:
        _unlink_quietly(holder)
        _unlink_quietly(lock)  # still holding it: a process that opened it a moment ago sees it gone and retries
        flock.release()


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str], option: str = "--out", *, command: str | None = None
                ) -> Iterator[Path]:
    """Hold ``path`` (a folder, created if missing) for this process until the block ends.

    The lock is ``path/.otkit.lock`` (a :class:`filelock.FileLock`, released by the OS if the process dies) with a
    holder record ``path/.otkit.lock.holder`` beside it (pid, command line, start time); both are removed when the
    block ends. A second process exits at once with the :class:`UserError` ``PATH is in use by another otkit process
    (pid N, "otkit ...", since HH:MM:SS); wait for it or choose another OPTION``. If the folder did not exist and the
    block leaves it empty (it failed before writing), the folder is removed again.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} exists and is not a folder")
    with _locked_in(path, path / LOCK_NAME, path, option, command):
        yield path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], option: str = "--out", *, command: str | None = None) -> Iterator[Path]:
    """Hold output file ``path`` for this process: as :func:`folder_lock`, the lock being the hidden
    ``.NAME.lock`` beside ``path`` (its folder is created if missing, and removed again if left empty)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    with _locked_in(parent, path.with_name(f".{path.name}.lock"), path, option, command):
        yield path


@contextlib.contextmanager
def _locked_in(folder: Path, lock: Path, shown: Path, option: str, command: str | None) -> Iterator[None]:
    """:func:`_locked` on ``lock`` inside ``folder``, created if missing and removed again if the block leaves it
    empty (it failed before writing anything)."""
    created = []  # the folders this call creates, deepest first (runs/NAME, then runs/)
    for p in (folder, *folder.parents):
        if p.exists():
            break
        created.append(p)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from e
    try:
        with _locked(lock, shown, option, command):
            yield
    finally:
        for p in created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break


def path_name(path: str) -> str:
    """The last component of a path recorded as text on any system (``/`` or ``\\`` separated): the file name a
    report shows for its engine or twin; the text itself when it has no name part."""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or path


def require_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise :class:`UserError` if it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    return p


def require_dir(path: str | os.PathLike[str], what: str = "folder") -> Path:
    """Return ``path`` as a Path, or raise :class:`UserError` if it is not an existing folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} is not a folder: {p}")
    return p
