"""Atomic file writes: a reader never sees a half-written file that looks complete.

Every file the package writes goes through ``atomic_write``: the content is written to a
temporary sibling, then renamed over the target (``os.replace`` is atomic on one filesystem).
``durable=True`` also fsyncs the file and its folder, for files a resumed job relies on.
Temporary names carry the pid and a random token, so two writers never share one.

``output_lock`` gives a job exclusive use of its output folder (``fcntl.flock`` on a lock file in
it, released by the kernel when the process ends, even on SIGKILL): a second job on the same
folder fails at once instead of interleaving its files with the first one's. The lock file is
removed on release (a killed job leaves it behind, harmlessly: nobody holds its flock).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mneme_plugin.errors import CheckpointError, DiskSpaceError, OutputExistsError, OutputLockedError

LOCK_FILE = ".mneme.lock"
# .<stem>.<pid>.<token>.tmp<suffix> (files) and .<name>.<pid>.<token>.tmp (folders)
_TMP_PATTERN = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?P<suffix>\.[^.]*)?$")

F = TypeVar("F", bound=Callable[..., Any])


def read_json(path: str | os.PathLike[str], remedy: str) -> Any:
    """A JSON file a stage wrote; a corrupt one (cut by a crash, edited by hand) is a CheckpointError
    that says which file and ``remedy`` (what to run again)."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({err}); {remedy}.") from err


def require_json_shape(path: str | os.PathLike[str], data: Any, needed: dict[str, type | tuple[type, ...]],
                       remedy: str) -> dict[str, Any]:
    """``data`` (read from ``path`` by ``read_json``) as a JSON object holding each key of ``needed``
    with a value of its type; otherwise a CheckpointError naming the file, what is missing or of the
    wrong type, and ``remedy`` (valid JSON of another shape, e.g. ``{}`` written by hand, would
    otherwise surface as a KeyError far from the file)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a stage's file: a JSON {type(data).__name__}, not an object with keys "
                              f"{', '.join(needed)}; {remedy}.")
    missing = [key for key in needed if key not in data]
    wrong = [f"{key!r} is a {type(data[key]).__name__}" for key, kind in needed.items()
             if key in data and not isinstance(data[key], kind)]
    if missing or wrong:
        problems = ([f"it lacks the key(s) {', '.join(map(repr, missing))}"] if missing else []) + wrong
        raise CheckpointError(f"{path} is not a stage's file: {'; '.join(problems)}; {remedy}.")
    return data


def records_problem(records: list[Any], columns: Iterable[str]) -> str | None:
    """What keeps ``records`` (a table saved as a JSON list of row objects) from being read: a row that is
    not an object, or a column a reader needs that a row lacks; None when readable."""
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            return f"row {i} is a {type(row).__name__}, not an object"
        missing = [c for c in columns if c not in row]
        if missing:
            return f"row {i} lacks {', '.join(map(repr, missing))}"
    return None


def json_digest(obj: Any, length: int = 16) -> str:
    """SHA-256 (hex, first ``length`` characters) of ``obj`` as sorted-key JSON (``str`` for the rest):
    the key of everything cached or compared by content (run stages, taxonomies, organisms, judge answers)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex, first 16 characters), read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def content_digest(path: str | os.PathLike[str], full_below: int = 256 << 20, sample: int = 4 << 20) -> str:
    """A digest of a file's content that stays cheap on large files: SHA-256 of every byte below
    ``full_below`` bytes; above, of the size, the first and the last ``sample`` bytes (a corpus
    rewritten in place changes its size or its ends, and hashing gigabytes on every plan would not pay)."""
    import hashlib

    size = os.path.getsize(path)
    if size < full_below:
        return file_digest(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(sample))
        fh.seek(size - sample)
        digest.update(fh.read(sample))
    return digest.hexdigest()[:16]


def stat_digest(path: str | os.PathLike[str], skip_dirs: tuple[str, ...] = ()) -> str | None:
    """A digest of what a file or folder holds, from metadata alone: SHA-256 of every file's path
    (relative to ``path``), size and modification time, recursively; None when ``path`` does not
    exist. Model folders hold gigabytes, so their bytes are not read: weights saved over old ones
    change the times (a copy that does not keep them only costs a rerun). ``skip_dirs``: names of
    folders left out wherever they are (``__pycache__``: what importing a folder's code writes in it)."""
    import hashlib

    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(
        f for f in root.rglob("*") if f.is_file() and not set(f.relative_to(root).parts[:-1]) & set(skip_dirs))
    digest = hashlib.sha256()
    for f in files:
        info = f.stat()
        digest.update(f"{f.relative_to(root) if f != root else f.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def size_text(size: int) -> str:
    """A size in bytes for people: KiB below a MiB, MiB below a GiB, GiB below a TiB, TiB below a PiB, PiB."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.1f} KiB"


def nearest_existing(folder: str | os.PathLike[str]) -> Path:
    """``folder`` or its nearest existing parent: where a folder not created yet will be, for its disk."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tree_size(folder: str | os.PathLike[str], pattern: str = "*") -> int:
    """Bytes of the files under ``folder`` whose names match ``pattern`` (0 when it does not exist)."""
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file()) if folder.is_dir() else 0


def require_free_space(folder: str | os.PathLike[str], needed: int, what: str, remedy: str) -> None:
    """Refuse to start a job that will write ``needed`` more bytes under ``folder`` when its disk has less free
    (DiskSpaceError), rather than fail hours later with a full disk."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if needed > free:
        raise DiskSpaceError(f"{what} needs ~{size_text(needed)} more in {folder}, but its disk has {size_text(free)} "
                             f"free: {remedy}.")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path, suffix: str | None = None) -> Path:
    """A hidden, unique temporary name next to ``path`` (same suffix by default, so writers keyed on it still work)."""
    suffix = path.suffix if suffix is None else suffix
    stem = path.stem if suffix == path.suffix else path.name
    return path.with_name(f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def temporary_target(name: str) -> str | None:
    """The name of the file a ``temporary_sibling`` named ``name`` is written for; None if ``name`` is no
    temporary."""
    m = _TMP_PATTERN.match(name)
    return m["stem"] + (m["suffix"] or "") if m else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporaries left in ``folder`` by killed writers; call it only while holding its ``output_lock``."""
    import shutil

    removed = 0
    folder = Path(folder)
    for p in folder.iterdir() if folder.is_dir() else ():
        m = _TMP_PATTERN.match(p.name)
        if m and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str], what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed); OutputLockedError at once if another process has it.

    The lock is per process and not re-entrant across processes; within one process a nested lock on the
    same folder (a run's stage locking its own folder again) is granted.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:  # this process already holds it (e.g. `mneme run` around its stages)
        yield folder
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run unguarded
        yield folder
        return
    lock_path = folder / LOCK_FILE
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by another mneme process (pid {holder}, lock {lock_path}): wait for it to "
                f"finish or choose another {what}."
            ) from None
        try:  # the holder we waited on may have removed the file meanwhile: lock the one on disk
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(key)
        try:
            yield folder
        finally:
            _HELD.discard(key)
            # The lock file goes with the lock (outputs hold only what the job wrote); a folder the
            # job created and left empty (it failed before writing) goes too.
            lock_path.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when empty
    finally:
        os.close(fd)  # releases the flock


_HELD: set[str] = set()


def holds_output_lock(parameter: str, what: str = "output folder") -> Callable[[F], F]:
    """Decorate a function so that it runs under ``output_lock`` of its argument ``parameter`` (if not None)."""

    def decorator(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments.get(parameter)
            if folder is None:
                return fn(*args, **kwargs)
            with output_lock(folder, what):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def refuse_overwrite(paths: Iterable[str | os.PathLike[str]], force: bool, how: str = "pass --force (force=True)") -> None:
    """OutputExistsError naming the existing files among ``paths``, unless ``force``."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        one = len(existing) == 1
        raise OutputExistsError(
            f"{', '.join(existing)} already exist{'s' if one else ''}: refusing to overwrite. "
            f"Choose another output folder, or {how} to replace {'it' if one else 'them'}."
        )


def _process_umask() -> int:
    mask = os.umask(0o022)  # read it (set and restored at import, before any thread writes)
    os.umask(mask)
    return mask


# safetensors creates its files 0600; ours get what open() would give them (0644 under umask 022),
# so a team's shared disk can read activation shards, crosscoders and checkpoints.
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], object], *, durable: bool = False) -> Path:
    """Call ``writer(tmp)`` on a temporary sibling of ``path`` (same suffix), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        writer(tmp)
        if tmp.is_file():
            os.chmod(tmp, FILE_MODE)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def atomic_directory(path: str | os.PathLike[str], writer: Callable[[Path], object], *, overwrite: bool = False,
                     durable: bool = False) -> Path:
    """Call ``writer(tmp_dir)`` on a temporary sibling folder, then rename it to ``path``.

    A folder at ``path`` is only ever complete: a crash leaves the hidden temporary folder behind
    (removed by the next attempt), never a half-written ``path``. An existing ``path`` is replaced
    only with ``overwrite``. ``durable=True`` also fsyncs every file before the rename (checkpoints
    a resume relies on).
    """
    import shutil

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output folder or pass overwrite.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)  # what a killed earlier attempt left (dead pids only)
    tmp = temporary_sibling(path, suffix="")
    tmp.mkdir()
    try:
        writer(tmp)
        for written in tmp.rglob("*"):  # what libraries wrote 0600 (safetensors) gets open()'s mode
            if written.is_file() and not written.is_symlink():
                os.chmod(written, FILE_MODE)
                if durable:
                    with open(written, "rb") as fh:
                        os.fsync(fh.fileno())
        if durable:
            fsync_dir(tmp)
        if path.exists():
            old = temporary_sibling(path, suffix=".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path


def data_file_rows(path: Path, builder: str = "json") -> int | None:
    """Rows a local data file holds, as datasets' ``builder`` reads it (``json``: JSON lines or a JSON array;
    ``csv``: rows after the header; ``parquet``: its row count); None when it is not a readable file. For
    size estimates (lm-eval's local tasks, an SFT data file)."""
    if not path.is_file():
        return None
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with path.open(encoding="utf-8") as lines:
            if builder == "csv":
                import csv

                return max(sum(1 for _ in csv.reader(lines)) - 1, 0)
            head = lines.read(1 << 12).lstrip()
            lines.seek(0)
            if head.startswith("["):
                return len(json.load(lines))
            return sum(1 for line in lines if line.strip())
    except (ImportError, OSError, UnicodeDecodeError, ValueError):
        return None
