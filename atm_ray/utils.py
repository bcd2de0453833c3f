"""Small helpers shared by the stages: console logging, atomic file writes and JSON."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


VERBOSE_ENV = "ATM_RAY_VERBOSE"  # "1": workers' own output comes to the console too (``-v``)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a test's captured output, a redirected job log)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console_logging(verbose: bool = False) -> None:
    """What a person at the console sees: atm-ray's own messages (stage starts and ends, progress,
    where results went) as plain lines on stdout; other libraries' warnings with their origin on
    stderr; everything with ``verbose``. The library only logs; the CLI, jobs and Ray Train workers call
    this once (it is idempotent)."""
    ours = logging.getLogger("atm_ray")
    if not any(getattr(handler, "atm_ray_console", False) for handler in ours.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.atm_ray_console = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        # transformers draws a "Loading weights" bar for every model it loads (each evaluation, each
        # fine-tuning's test scoring): noise between our lines. Its flag is read when it is imported.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].disable_progress_bar()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers inherit it (init_ray passes it on)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)


def settings_hash(sections: dict) -> str:
    """The hash that decides whether a stage is up to date: its settings, inputs and upstream hashes
    (every stage's manifest records it)."""
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (model weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_encodable(text: str) -> bool:
    """Whether ``text`` is real Unicode: JSON can carry lone surrogates (``"\\ud800"``), which no tokenizer
    can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; it replaces ``path`` when the block ends without
    error (readers never see half a file), and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as temporary, open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def publish_copy(source: str | Path, destination: str | Path) -> Iterator[Path]:
    """Copy ``source`` to a staging folder beside ``destination`` and yield it for additions; when the
    block ends without error, the staging folder replaces ``destination`` (readers never see half of it)."""
    destination = Path(destination)
    staging = destination.parent / f".{destination.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    yield staging
    shutil.rmtree(destination, ignore_errors=True)
    staging.replace(destination)


LOCK_FILE = ".atm-ray.lock"


class RunFolderBusy(RuntimeError):
    """Another live program is writing into the same run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def run_folder_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold ``<run_dir>/.atm-ray.lock`` while a command writes into the run folder, so that a second run
    into the same folder is refused instead of racing the first. A lock left by a process that has
    died on this machine is taken over."""
    import socket

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}  # half-written by a process that died between create and write, or just removed
            if holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not holder:
                lock.unlink(missing_ok=True)
                continue
            raise RunFolderBusy(
                f"{run_dir} is in use by process {holder.get('pid')} on {holder.get('host')} "
                f"({holder.get('command', '?')}). Wait for it to finish or stop it, or pass another --run-dir; "
                f"if that process is gone, delete {lock}."
            ) from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump(mine, handle)
        break
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == mine["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass
