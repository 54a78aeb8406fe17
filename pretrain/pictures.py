"""Picture grids for ``reconstruct()``: rows = samples, columns = named 2D slices, one PNG per call.

Every picture medssl draws (these grids and the fine-tuning overlays) uses one orientation convention,
stated in its title: the radiological view of an axial slice of a RAS volume (patient's right on the
image's left, anterior up)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

VIEW = "radiological view: axial slice,\npatient's right on the image's left, anterior up"


def radiological(axial: np.ndarray) -> np.ndarray:
    """An axial ``[X, Y]`` slice of a RAS volume as image rows × columns in the radiological view
    (``imshow`` with its default upper origin)."""
    return axial[::-1, ::-1].T


def draw_grid(cols: dict[str, np.ndarray], style: Callable[[str, int], dict] | None = None,
              path: str | Path | None = None, title: str | None = None, legend: dict[str, tuple] | None = None,
              row_label: Callable[[int], str] | None = None) -> np.ndarray:
    """Draw ``cols`` (title → ``[n, X, Y]`` axial slices of RAS volumes) as an RGB uint8 ``[H, W, 3]`` image.

    ``style(title, row)`` gives the ``imshow`` keywords of a panel (colour map, value range); ``path`` also
    saves it as a PNG. ``title`` heads the picture (default: the step read from a ``stepNNNNNNNN.png``
    path), followed by the view convention; ``legend`` (name → colour) explains label colours;
    ``row_label(r)`` names each row (default ``sample r``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if title is None and path is not None:
        m = re.search(r"step0*(\d+)", Path(path).stem)
        title = f"step {m.group(1)}" if m else Path(path).stem
    n = next(iter(cols.values())).shape[0]
    fig = Figure(figsize=(2.2 * len(cols), 2.2 * n + 0.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(n, len(cols), squeeze=False)
    for r in range(n):
        for c, (name, v) in enumerate(cols.items()):
            ax = axes[r, c]
            ax.imshow(radiological(v[r]), interpolation="nearest",
                      **({"cmap": "gray"} | (style(name, r) if style else {})))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_label(r) if row_label else f"sample {r}", fontsize=8)
    fig.suptitle(f"{title + chr(10) if title else ''}{VIEW}", fontsize=8)
    if legend:
        fig.legend(handles=[Patch(color=col, label=name) for name, col in legend.items()], loc="lower center",
                   ncol=min(len(legend), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05 if legend else 0, 1, 1))
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # [H, W, 3] uint8
    if path is not None:
        import matplotlib.image

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        matplotlib.image.imsave(str(path), rgb)
    return rgb
