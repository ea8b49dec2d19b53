"""Files petah writes: checked before any work (a run must not train for minutes and then fail to
write), written atomically (a reader never sees half a file, a failure leaves none behind), and
only inside the folder they are meant for (names from packages are untrusted input).

The bottom of the tree: imports nothing from petah but ``petah.errors``, so every writer can use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from petah.errors import PetahError


def fsync_folder(folder: Path) -> None:
    """Make a rename into ``folder`` durable: without it a power cut after ``os.replace`` can bring
    back the old name (or none) on ext4 / xfs, though the file's own bytes were synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or file system that cannot open folders: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (tmpfs on old kernels, network mounts) refuse: the rename still happened
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so that a reader or a crash sees the old file or the new one,
    never a part: a synced temp file in the same folder, renamed into place, the folder synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def check_writable(path: str | Path) -> Path:
    """Refuse an output file petah could not write; return it as a ``Path``.

    Missing parent folders are fine (writers create them), but the nearest existing ancestor must
    be a folder this process can create a file in, and the path itself must not be a folder. The
    test is a real temp file, made and removed: ``os.access`` says yes to root even where nothing
    can be created (``/proc``, a read-only mount).
    """
    path = Path(path)
    if path.is_dir():
        raise PetahError(f"cannot write {path}: it is a folder; name a file")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:  # a root that does not exist (another drive): nothing to test
            return path
        parent = parent.parent
    if not parent.is_dir():
        raise PetahError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".petah-write-check.", dir=parent)
    except PermissionError:
        raise PetahError(f"cannot write {path}: no permission to write in {parent}") from None
    except OSError as exc:
        raise PetahError(f"cannot write {path}: cannot create a file in {parent} ({exc.strerror or exc})") from None
    os.close(handle)
    os.unlink(probe)
    return path


class AppendLog:
    """A file of lines only ever appended to (a capture index, an audit log), safe against a crash
    at any point: a line torn by a crash mid-write stays as it is (readers skip it) and the next
    append starts on a new line, so it cannot swallow the record after it. ``sync``: each append
    reaches the disk before it returns. ``max_bytes``: past it the file moves to ``NAME.1``
    (replacing the older one) before the next append, one durable rename."""

    def __init__(self, path: str | Path, *, sync: bool = True, max_bytes: int | None = None):
        self.path, self.sync, self.max_bytes = Path(path), sync, max_bytes
        self._torn = self._ends_torn()

    def _ends_torn(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                if handle.seek(0, os.SEEK_END) == 0:
                    return False
                handle.seek(-1, os.SEEK_END)
                return handle.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def _rotate(self) -> None:
        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fsync_folder(self.path.parent)
        self._torn = False

    def append(self, line: bytes) -> int:
        """Append one line (ending in a newline); the bytes the file grew by."""
        if self.max_bytes is not None:
            self._rotate()
        data = (b"\n" if self._torn else b"") + line
        try:
            with open(self.path, "ab") as handle:
                handle.write(data)
                handle.flush()
                if self.sync:
                    os.fsync(handle.fileno())
        except BaseException:
            self._torn = self._ends_torn()  # a full disk may have taken part of it
            raise
        self._torn = False
        return len(data)


def atomic_write_image(image, path: Path) -> Path:
    """A PIL image as PNG, written like every other file petah writes (temp file, then rename)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(Path(path), buffer.getvalue())


def inside(folder: str | Path, *parts: str) -> Path:
    """``folder / parts…``, refused unless it stays inside ``folder`` (no ``..``, no absolute part)."""
    base = Path(folder).resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or base not in path.parents:
        raise PetahError(f"refusing to write {'/'.join(parts)!r}: it would leave the output folder {folder}")
    return path


@contextlib.contextmanager
def staged_folder(output: str | Path) -> Iterator[Path]:
    """Write a folder's files into a hidden sibling and move it into place only when all succeeded.

    Files already in ``output`` that the new set does not replace are kept; on failure ``output``
    is left exactly as it was and the partial files are removed.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise PetahError(f"{output} exists and is not a folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield stage
        output.mkdir(exist_ok=True)
        blocked = [item.name for item in stage.iterdir() if (output / item.name).is_dir()]
        if blocked:
            raise PetahError(f"cannot write {output / blocked[0]}: a folder of that name is in the way")
        for item in sorted(stage.iterdir()):
            os.replace(item, output / item.name)
        fsync_folder(output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class DiskQueue:
    """Records (JSON lines) kept on disk until delivered, in order, at least once: appended to
    ``FOLDER/queue.jsonl`` (an ``AppendLog``), read from a position kept in ``FOLDER/sent`` — a
    fixed-width number rewritten in place (one small write a record; a crash leaves the old number
    or the new one, and an old one only means a record sent again). ``max_bytes`` bounds what waits
    (past it a new record is refused); a fully delivered queue past ``compact_bytes`` is emptied.
    Used by the line's sinks and the fleet agent's reports."""

    def __init__(self, folder: str | Path, *, max_bytes: int, sync: bool = False, compact_bytes: int = 1 << 20):
        self.folder, self.max_bytes, self.compact_bytes = Path(folder), max_bytes, compact_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.queue_path, self.sent_path = self.folder / "queue.jsonl", self.folder / "sent"
        self.sync = sync
        self._log = AppendLog(self.queue_path, sync=sync)
        self._lock = threading.Lock()
        self.position = self._read_position()
        self._mark_fd = os.open(self.sent_path, os.O_RDWR | os.O_CREAT, 0o644)

    def _read_position(self) -> int:
        return self.read_position(self.folder)

    @staticmethod
    def read_position(folder: Path) -> int:
        queue, sent = Path(folder) / "queue.jsonl", Path(folder) / "sent"
        try:
            position = int(sent.read_bytes().strip() or 0)
        except (OSError, ValueError):
            position = 0
        size = queue.stat().st_size if queue.exists() else 0
        return position if 0 <= position <= size else 0  # emptied after the mark was written: start over

    @staticmethod
    def backlog_of(folder: str | Path) -> int:
        """What a queue in ``folder`` still holds, read from outside (another process's queue)."""
        queue = Path(folder) / "queue.jsonl"
        size = queue.stat().st_size if queue.exists() else 0
        return max(0, size - DiskQueue.read_position(Path(folder)))

    @property
    def backlog_bytes(self) -> int:
        size = self.queue_path.stat().st_size if self.queue_path.exists() else 0
        return max(0, size - self.position)

    def put(self, line: bytes) -> bool:
        """Queue one record (a line ending in a newline); False when the queue is full. Raises
        OSError when it cannot be written."""
        with self._lock:
            if self.backlog_bytes + len(line) > self.max_bytes:
                return False
            self._log.append(line)
            return True

    def next(self) -> bytes | None:
        """The oldest record not yet delivered (with its newline), or None."""
        if not self.queue_path.exists():
            return None
        with open(self.queue_path, "rb") as handle:
            handle.seek(self.position)
            line = handle.readline()
        return line if line.endswith(b"\n") else None  # nothing new (or a line being appended)

    def _write_mark(self, position: int) -> None:
        os.pwrite(self._mark_fd, b"%020d\n" % position, 0)
        if self.sync:
            os.fsync(self._mark_fd)
        self.position = position

    def delivered(self, line: bytes) -> None:
        """The record ``next`` gave is delivered: the position moves past it."""
        self._write_mark(self.position + len(line))
        if self.position >= self.compact_bytes:
            with self._lock:
                if self.backlog_bytes == 0:  # all delivered, nothing appended meanwhile: empty the queue
                    os.truncate(self.queue_path, 0)  # a crash before the next line: the mark is past the end
                    self._log = AppendLog(self.queue_path, sync=self.sync)
                    self._write_mark(0)

    def close(self) -> None:
        os.close(self._mark_fd)
