"""Picture grids for ``reconstruct()``: rows = samples, columns = named 2D slices, one PNG per call."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def draw_grid(cols: dict[str, np.ndarray], style: Callable[[str, int], dict] | None = None,
              path: str | Path | None = None) -> np.ndarray:
    """Draw ``cols`` (title → ``[n, X, Y]`` slices; x → right, y → up) as an RGB uint8 ``[H, W, 3]`` image.

    ``style(title, row)`` gives the ``imshow`` keywords of a panel (colour map, value range); ``path`` also
    saves it as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = next(iter(cols.values())).shape[0]
    fig = Figure(figsize=(2.2 * len(cols), 2.2 * n), dpi=100)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(n, len(cols), squeeze=False)
    for r in range(n):
        for c, (title, v) in enumerate(cols.items()):
            ax = axes[r, c]
            ax.imshow(v[r].T, origin="lower", interpolation="nearest", **({"cmap": "gray"} | (style(title, r) if style else {})))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # [H, W, 3] uint8
    if path is not None:
        import matplotlib.image

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        matplotlib.image.imsave(str(path), rgb)
    return rgb
