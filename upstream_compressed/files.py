"""The tool's own files: atomic writes with the permissions a plain ``open()`` would give, and YAML reads.

Every file this tool writes goes through here: a temporary file beside the target, flushed and
fsynced, then renamed, so a reader (or a run killed half-way) never sees half a file. ``mkstemp``
creates its file 0600; the rename would keep that, and a delta shared in a lab folder could not be
read by colleagues, so the final mode is ``0666 & ~umask`` (0644 under the usual umask 022).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX offers no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda out: out.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (one trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` straight into the temporary file (no second copy of a large checkpoint in memory)."""
    import torch

    return atomic_write(path, lambda out: torch.save(obj, out))


def read_yaml(path: Path, error: type[Exception], label: str) -> Any:
    """``path``'s YAML (None for an empty file); unreadable YAML raises ``error`` naming ``label``."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as problem:
        raise error(f"{label} is not valid YAML: {problem}") from problem
