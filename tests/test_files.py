"""Atomic writes give files the mode a plain open() would, so shared deltas are readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from upstream_compressed.cli import main
from upstream_compressed.files import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text


def _recipe(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def test_a_delta_written_by_compress_under_umask_022_is_0644(tmp_path, hubert_ckpt, umask):
    umask(0o022)
    out = tmp_path / "shared" / "identity.safetensors"
    assert main(["compress", _recipe(tmp_path, {"base": str(hubert_ckpt), "steps": []}), "-o", str(out)]) == 0
    assert _mode(out) == 0o644


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_atomic_writer_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    written = [
        atomic_write_bytes(tmp_path / "a.bin", b"x"),
        atomic_write_text(tmp_path / "b.txt", "x"),
        atomic_write_json(tmp_path / "c.json", {"x": 1}),
        atomic_torch_save({"x": torch.ones(2)}, tmp_path / "d.pt"),
    ]
    assert [_mode(path) for path in written] == [expected] * 4
    assert torch.load(tmp_path / "d.pt", weights_only=True)["x"].tolist() == [1.0, 1.0]


def test_a_failed_write_leaves_neither_the_target_nor_a_temporary(tmp_path):
    def fail(out):
        out.write(b"half")
        raise RuntimeError("disk full")

    from upstream_compressed.files import atomic_write

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "x.bin", fail)
    assert list(tmp_path.iterdir()) == []
