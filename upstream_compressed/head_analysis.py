"""``upstream-compressed analyse heads``: per attention head, importance and diagonality, as a table and a plot.

Per head: its L1 and data-driven importance (the scores head pruning uses), its diagonality
(:mod:`.compress.diagonality`), and its place in the order in which global head pruning removes
heads by each importance (L1 raw; data-driven normalised per layer, as ``selection: global`` does).
Writes ``heads.csv``, ``heads.json`` and ``heads.png`` (heads in pruning order, coloured by
diagonality, and a layer x head map of diagonality) into the output folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .delta import atomic_write_bytes

CSV_FIELDS = ("layer", "head", "l1", "data_driven", "diagonality", "prune_order_l1", "prune_order_data_driven")


@dataclass
class HeadRow:
    layer: int
    head: int  # index among the heads the analysed model has in this layer
    l1: float
    data_driven: float
    diagonality: float
    prune_order_l1: int  # 0: the first head global L1 pruning removes
    prune_order_data_driven: int


def analyse_heads(model, audio: str, band: int, max_utterances: int = 32, max_seconds: float = 8.0,
                  batch_size: int = 4, projections: int = 4, seed: int = 0) -> list[HeadRow]:
    """Score every head of ``model`` on the audio of ``audio`` (a directory)."""
    from .compress.diagonality import diagonality_scores
    from .compress.head_pruning import l1_head_scores
    from .compress.importance import data_driven_scores
    from .compress.selection import global_order

    l1 = l1_head_scores(model)
    data = data_driven_scores(model, "heads", audio, max_utterances, max_seconds, batch_size, projections, seed)
    diagonal = diagonality_scores(model, audio, band, max_utterances, max_seconds, batch_size, seed)
    order_l1 = {head: rank for rank, head in enumerate(global_order(l1, normalize=False))}
    order_data = {head: rank for rank, head in enumerate(global_order(data, normalize=True))}
    return [
        HeadRow(i, j, float(l1[i][j]), float(data[i][j]), float(diagonal[i][j]), order_l1[i, j], order_data[i, j])
        for i in range(len(l1)) for j in range(len(l1[i]))
    ]


def write_table(rows: list[HeadRow], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """``heads.csv`` (one row per head) and ``heads.json`` (``meta`` plus the rows), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    csv_path, json_path = out_dir / "heads.csv", out_dir / "heads.json"
    atomic_write_bytes(csv_path, buffer.getvalue().encode())
    atomic_write_bytes(json_path, json.dumps({**meta, "heads": [asdict(r) for r in rows]}, indent=2).encode())
    return csv_path, json_path


def plot_heads(rows: list[HeadRow], path: Path, title: str) -> Path:
    """Heads in each pruning order (bar height: importance, colour: diagonality) and a diagonality map."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    colour = plt.get_cmap("viridis")
    fig, axes = plt.subplots(3, 1, figsize=(max(9.0, 0.25 * len(rows) + 2), 10), constrained_layout=True)
    for ax, key, label in ((axes[0], "l1", "L1"), (axes[1], "data_driven", "data-driven (per-layer normalised)")):
        ordered = sorted(rows, key=lambda r: getattr(r, f"prune_order_{key}"))
        values = np.array([getattr(r, key) for r in ordered])
        if key == "data_driven":  # the scale global selection compares: each layer divided by its L2 norm
            norms = {layer: np.linalg.norm([r.data_driven for r in rows if r.layer == layer]) or 1.0
                     for layer in {r.layer for r in rows}}
            values = values / np.array([norms[r.layer] for r in ordered])
        ax.bar(range(len(ordered)), values, color=[colour(r.diagonality) for r in ordered])
        ax.set_title(f"{label} global pruning order, first pruned on the left")
        ax.set_ylabel("importance")
        if len(ordered) <= 64:
            ax.set_xticks(range(len(ordered)), [f"L{r.layer}H{r.head}" for r in ordered], rotation=90, fontsize=7)
    layers = max(r.layer for r in rows) + 1
    width = max(r.head for r in rows) + 1
    grid = np.full((layers, width), np.nan)
    for r in rows:
        grid[r.layer, r.head] = r.diagonality
    image = axes[2].imshow(grid, cmap=colour, vmin=0.0, vmax=1.0, aspect="auto")
    axes[2].set_xticks(range(width))
    axes[2].set_yticks(range(layers))
    axes[2].set_xlabel("head")
    axes[2].set_ylabel("layer")
    axes[2].set_title("diagonality (attention mass near the diagonal)")
    fig.colorbar(image, ax=axes, label="diagonality")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_analysed_model(upstream: str | None, base: str | None, mean_std: str | None):
    """The model to analyse: a delta (``upstream``; its base from ``base`` or the delta's record) or a base."""
    from .bases import resolve_base
    from .delta import build_compressed, read_delta
    from .hubconf import find_base
    from .model import SpeechTransformer
    from .model.convert import load_base

    if upstream:
        delta = read_delta(upstream)
        base_path = Path(base) if base else find_base(delta, Path(upstream), None, refresh=False)
        return build_compressed(delta, base_path, mean_std, search=[Path(upstream).parent]).eval(), str(upstream)
    if not base:
        raise FileNotFoundError("give the model to analyse: --upstream DELTA.safetensors or --base CHECKPOINT")
    converted = load_base(resolve_base(base), mean_std=mean_std)
    return SpeechTransformer.from_state_dict(converted.config, converted.state_dict).eval(), str(base)


def run(upstream: str | None, base: str | None, audio: str, out_dir: str | os.PathLike, band: int,
        max_utterances: int, max_seconds: float, batch_size: int, projections: int, seed: int,
        mean_std: str | None = None) -> dict[str, Any]:
    """The whole command: load, score, write table and plot. Returns the written paths and the rows."""
    model, name = load_analysed_model(upstream, base, mean_std)
    if not any(layer.num_heads for layer in model.config.layers):
        raise ValueError(f"{name} has no attention heads left to analyse")
    rows = analyse_heads(model, audio, band, max_utterances, max_seconds, batch_size, projections, seed)
    out = Path(out_dir)
    meta = {
        "model": name, "audio": str(audio), "diagonal_band": band, "max_utterances": max_utterances,
        "max_seconds": max_seconds, "projections": projections, "seed": seed,
        "frame_ms": 1000 * model.config.downsample_rate / 16000,
        "prune_order": "global selection: L1 raw; data-driven divided by each layer's L2 norm (Michel et al.)",
    }
    csv_path, json_path = write_table(rows, out, meta)
    png = plot_heads(rows, out / "heads.png", f"{Path(name).name}: {len(rows)} heads, band ±{band} frames")
    return {"csv": csv_path, "json": json_path, "png": png, "rows": rows}
