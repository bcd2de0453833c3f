"""Opening corpus paths: local files, the slice bundled in the package, or any pyarrow filesystem URI."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pyarrow.fs as pafs

from atm_ray.config import AtmRayError

BUNDLED_PREFIX = "bundled:"


def bundled_root() -> Path:
    return Path(str(resources.files("atm_ray").joinpath("bundled_data")))


def resolve(path: str, root: str | Path = ".") -> str:
    """Return an absolute local path or a URI for ``path``.

    ``bundled:<rel>`` points into the package's data slice, ``scheme://...`` is passed through, and
    anything else is taken relative to ``root`` (the preset's ``data.root``).
    """
    if path.startswith(BUNDLED_PREFIX):
        return str(bundled_root() / path[len(BUNDLED_PREFIX) :])
    if "://" in path:
        return path
    return str((Path(root) / path).resolve())


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def exists(location: str) -> bool:
    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def read_text(location: str) -> str:
    filesystem, path = _filesystem(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no such file")
    with filesystem.open_input_stream(path) as stream:
        raw = stream.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise AtmRayError(f"{location}:{line}: not valid UTF-8 ({error.reason})") from None


def list_files(location: str, suffix: str = "") -> list[str]:
    """Files directly inside a folder, sorted, as locations of the same kind as ``location``."""
    filesystem, path = _filesystem(location)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    prefix = location[: len(location) - len(path)] if "://" in location else ""
    names = sorted(info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(suffix))
    return [prefix + name for name in names]


def join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name
