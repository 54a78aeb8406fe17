"""Sliding-window inference, Dice, predictions in the original geometry, overlays.

Validation scores the prepared grid (RAS, pretraining spacing), as the official UNETR/Hi-End-MAE
pipelines do. The test set is scored where the user's files live: class probabilities are resampled
(trilinear) from the prepared grid onto each image's own voxel grid through the two affines, the argmax
is written as a NIfTI with the image's shape and affine, and Dice is computed against the original label
file. Dice per class uses MONAI's ``compute_dice`` (NaN where a class is absent from both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def predict_probs(model, image: np.ndarray, cfg, device: torch.device, autocast) -> torch.Tensor:
    """Softmax probabilities ``[K, X, Y, Z]`` (float32, CPU) of a windowed volume ``[C, X, Y, Z]``."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)  # [1, C, X, Y, Z]
    was_training = model.training
    model.eval()
    with autocast:
        logits = sliding_window_inference(x, roi_size=tuple(cfg.data.crop_size), sw_batch_size=cfg.eval.sw_batch,
                                          predictor=model, overlap=cfg.eval.overlap, mode=cfg.eval.mode)
    model.train(was_training)
    return torch.softmax(logits.float(), dim=1)[0].cpu()  # [K, X, Y, Z]


def dice_per_class(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, n_classes: int,
                   spacing=None, hd95: bool = False) -> dict:
    """``{"dice": {c: value}, "hd95": {c: value}}`` for the foreground classes 1..K-1 of two label maps."""
    import warnings

    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)  # MONAI-internal

    p = torch.as_tensor(np.asarray(pred), dtype=torch.long)[None, None]  # [1, 1, X, Y, Z]
    t = torch.as_tensor(np.asarray(truth), dtype=torch.long)[None, None]
    p1, t1 = one_hot(p, n_classes, dtype=torch.uint8), one_hot(t, n_classes, dtype=torch.uint8)  # [1, K, X, Y, Z]
    d = compute_dice(p1, t1, include_background=False, ignore_empty=True)[0]  # [K-1]
    out = {"dice": {c: float(d[c - 1]) for c in range(1, n_classes)}}
    if hd95:
        h = compute_hausdorff_distance(p1, t1, include_background=False, percentile=95,
                                       spacing=list(spacing) if spacing is not None else None)[0]
        out["hd95"] = {c: float(h[c - 1]) for c in range(1, n_classes)}
    return out


def resample_to_original(probs: torch.Tensor, prepared_affine, original_affine, original_shape,
                         slab: int = 16) -> np.ndarray:
    """Labels ``[X', Y', Z']`` (uint8) on the original voxel grid from probabilities ``[K, X, Y, Z]`` on
    the prepared grid: trilinear interpolation of each class map, then argmax; outside the prepared
    grid (a body crop) is background. Slab by slab, so the memory stays ~K × one slab."""
    import torch.nn.functional as F

    a_p = np.asarray(prepared_affine, dtype=np.float64)
    a_o = np.asarray(original_affine, dtype=np.float64)
    m = np.linalg.inv(a_p) @ a_o  # original voxel index → prepared voxel index
    size = np.array(probs.shape[1:], dtype=np.float64)
    X, Y, Z = (int(s) for s in original_shape)
    out = np.zeros((X, Y, Z), dtype=np.uint8)
    jj, kk = np.meshgrid(np.arange(Y), np.arange(Z), indexing="ij")  # [Y, Z]
    vol = probs[None].float()  # [1, K, X, Y, Z]
    for x0 in range(0, X, slab):
        xs = np.arange(x0, min(X, x0 + slab))
        idx = np.stack(np.broadcast_arrays(xs[:, None, None], jj[None], kk[None], np.ones((1, 1, 1))), -1)  # [n, Y, Z, 4]
        src = idx @ m.T  # [n, Y, Z, 4] prepared (continuous) indices
        norm = 2.0 * src[..., :3] / np.maximum(size - 1, 1) - 1.0  # align_corners=True coordinates
        grid = torch.from_numpy(norm[..., ::-1].copy()).float()[None]  # [1, n, Y, Z, 3] as (z, y, x) for grid_sample
        p = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # [1, K, n, Y, Z]
        bg_only = p.sum(1, keepdim=True) <= 0  # outside the prepared grid
        lab = p.argmax(1)  # [1, n, Y, Z]
        lab[bg_only[:, 0]] = 0
        out[xs[0]:xs[-1] + 1] = lab[0].numpy().astype(np.uint8)
    return out


def write_nifti(labels: np.ndarray, affine, path: Path, reference: str | None = None) -> None:
    """Save a label map with ``affine`` (the reference image's header codes kept when it is given)."""
    import nibabel as nib

    header = None
    if reference is not None and Path(reference).exists() and str(reference).endswith((".nii", ".nii.gz")):
        header = nib.load(str(reference)).header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
    img = nib.Nifti1Image(labels.astype(np.uint8), np.asarray(affine, dtype=np.float64), header=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


from medssl.pretrain.pictures import VIEW, radiological


def overlay_png(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path, title: str,
                n_classes: int, slices: int = 1, classes: dict | None = None) -> list[int]:
    """Image / truth / prediction on the axial slices (RAS: the last axis) with the most foreground, a class
    legend (names and colours) and the view convention in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    area = (truth > 0).sum(axis=(0, 1))  # [Z]
    kinds = np.array([len(np.unique(truth[..., z])) for z in range(truth.shape[-1])])  # classes per slice
    zs = sorted(np.argsort(kinds * 1e9 + area)[::-1][:max(1, slices)].tolist())
    fig = Figure(figsize=(9, 3.1 * len(zs)), dpi=100)
    FigureCanvasAgg(fig)
    cmap = _label_cmap(n_classes)
    for r, z in enumerate(zs):
        base = radiological(image[..., z])  # RAS grid → radiological view: anterior up, patient's right on the left
        for c, (name, lab) in enumerate((("image", None), ("truth", truth), ("prediction", pred))):
            ax = fig.add_subplot(len(zs), 3, r * 3 + c + 1)
            ax.imshow(base, cmap="gray", interpolation="nearest")
            if lab is not None:
                m = np.ma.masked_equal(radiological(lab[..., z]), 0)
                ax.imshow(m, cmap=cmap, vmin=0, vmax=max(n_classes - 1, 1), alpha=0.55, interpolation="nearest")
            ax.set_title(f"{name} (slice z={z})" if c == 0 else f"{name} (z={z})", fontsize=9)
            ax.axis("off")
    from matplotlib.patches import Patch

    names = classes or {}
    handles = [Patch(color=cmap(k), label=f"{k} {names.get(k, f'class{k}')}") for k in range(1, n_classes)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{VIEW.replace(chr(10), ' ')}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return zs


def _label_cmap(n: int):
    import matplotlib

    base = matplotlib.colormaps["tab10"]
    from matplotlib.colors import ListedColormap

    return ListedColormap([(0, 0, 0, 0)] + [base(i % 10) for i in range(max(n - 1, 1))])
