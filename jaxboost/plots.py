"""Pictures of label maps and image grids: one palette, one overlay, one PNG grid writer.

Every PNG jaxboost draws (the SDM trainer's sample grids, `jaxboost corpus show --png`, the segmentation
overlays, the fidelity benchmark's grids, the demo report) goes through `image_grid`, so a structure has one
colour everywhere and every grid is written the same way (a title, then atomically: a reader never sees half).

Label sets: CAMUS masks (0 background, 1 LV, 2 MYO, 3 LA; Leclerc et al. 2019) and the SDM's five labels
(0 outside the cone, 1 LV, 2 tissue inside the cone, 3 MYO, 4 LA; see `jaxboost.data.labels.sdm_labels`).
"""
from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np
from etils import epath

STRUCTURE_COLOURS = {"background": (0, 0, 0), "outside": (0, 0, 0), "tissue": (90, 90, 90),
                     "LV": (220, 60, 60), "MYO": (60, 200, 90), "LA": (70, 120, 240)}
CAMUS_PALETTE = np.array([STRUCTURE_COLOURS[s] for s in ("background", "LV", "MYO", "LA")], np.uint8)
SDM_PALETTE = np.array([STRUCTURE_COLOURS[s] for s in ("outside", "LV", "tissue", "MYO", "LA")], np.uint8)


def label_colours(labels: np.ndarray, palette: np.ndarray = CAMUS_PALETTE) -> np.ndarray:
    """Label map [H, W] -> [H, W, 3] uint8 in the palette's colours (labels past its end take the last)."""
    return palette[np.clip(np.asarray(labels, np.intp), 0, len(palette) - 1)]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray = CAMUS_PALETTE,
            alpha: float = 0.45) -> np.ndarray:
    """Grayscale image [H, W] (0-255) + label map [H, W] -> [H, W, 3] uint8, non-zero labels tinted."""
    rgb = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=-1)
    labels = np.asarray(labels)
    tint = label_colours(labels, palette).astype(np.float32)
    blend = np.where(labels[..., None] > 0, (1 - alpha) * rgb + alpha * tint, rgb)
    return blend.clip(0, 255).astype(np.uint8)


def _draw_cell(ax, cell) -> None:
    """An image ([H, W] grayscale 0-255 or [H, W, 3|4] RGB) or a str (wrapped text)."""
    if isinstance(cell, str):
        ax.text(0, 0.5, textwrap.fill(cell, 40), fontsize=7, va="center")
    elif np.ndim(cell) == 2:
        ax.imshow(cell, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(cell, interpolation="nearest")
    ax.axis("off")


def image_grid(path, rows: Sequence[Sequence], titles: Sequence[Sequence[str]] | None = None,
               title: str | None = None, cell_inches: float = 2.4, dpi: int = 100) -> None:
    """Write rows of cells as one PNG at `path` (local or remote), atomically.

    rows[r][c]: an image or a str (see `_draw_cell`); titles[r][c]: that cell's title ("" for none);
    title: the figure's. Cells keep their pixels (nearest-neighbour), so label maps stay label maps.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxboost import jsonio
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.4 * bool(title)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            if c < len(row):
                _draw_cell(axes[r, c], row[c])
                if titles is not None and titles[r][c]:
                    axes[r, c].set_title(titles[r][c], fontsize=8)
            else:
                axes[r, c].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write_atomic(path, buffer.getvalue())
