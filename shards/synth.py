"""Synthetic CT/MRI torso phantoms: the project's demo and test data, with no downloads.

Research engineers trying medssl (or testing a change to it) need volumes that look and behave like
abdominal CT: plausible Hounsfield units, organs of varying size and position, anisotropic spacing,
RAS and LPS affines, a permuted axis order now and then, and labels for a fine-tuning check. This
module writes such a dataset in the nnU-Net v2 raw layout that ``python -m medssl.shards build`` reads::

    out/imagesTr/phantom_000_0000.nii.gz   CT: int16 HU (scl_slope 1, scl_inter 0); MR: float32 >= 0
    out/labelsTr/phantom_000.nii.gz        uint8: 0 background, 1 liver, 2 spleen, 3 kidney (both),
                                           4 lung (both), 5 spine (vertebrae), 6 aorta
    out/dataset.json                       channel_names, labels, numTraining, file_ending, ...

Body wall, subcutaneous and visceral fat, muscle, bowel, heart, ribs, discs and the couch appear in
the image but are not labelled. Each subject is drawn in a world-aligned RAS+ grid (+x toward the
patient's right, +y anterior, +z superior; nibabel's convention) and then stored in one of several
orientations, so ``nibabel.as_closest_canonical`` always shows the liver at +x and the spleen at -x.

Subject ``i`` depends only on ``(seed, i, modality, fov_scale)``: ``n=3`` and ``n=5`` share their first
three files byte for byte, and gzip streams carry no timestamp.

Opt-in ``variation`` (0..1, ``--variation``; default 0 writes exactly the files above) makes a harder task
for few-shot fine-tuning: organ size and position vary more between subjects, each CT subject gets a
contrast phase (non-contrast, arterial, portal, delayed) in which liver and spleen HU overlap and swap order,
the liver holds vessels, and texture and noise grow. Its draws come from a generator of their own, so
subject ``i`` at ``variation=v`` has the same body, grid and orientation as at 0; it then depends on
``(seed, i, modality, fov_scale, variation)``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy.ndimage import correlate1d

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lung": 4, "spine": 5, "aorta": 6}
MODALITIES = {"CT": 1, "MR": 2}  # the code goes into the seed, so CT and MR subjects differ
PREFIX = {"CT": "phantom", "MR": "phantommr"}
# Stored axis codes, cycled over subjects (offset by the seed): RAS, LPS (DICOM's world axes) and
# IPL (slices along axis 0, rows posterior, columns left: what a naive DICOM stack gives).
ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"), ("R", "A", "S"), ("I", "P", "L"))

# Tissues of the phantom. Columns: label, CT HU, CT inter-subject jitter (+-), CT texture amplitude,
# MR (T1-like, arbitrary units), MR texture amplitude. Contrast-enhanced CT (portal-venous-ish phase).
_TISSUES = {
    "air":      (0, -1000, 0, 0, 0, 0),
    "fat":      (0, -100, 10, 5, 1000, 40),
    "muscle":   (0, 45, 8, 6, 400, 20),
    "bowel":    (0, 30, 10, 15, 350, 40),
    "vfat":     (0, -95, 10, 8, 950, 40),
    "gas":      (0, -850, 80, 30, 20, 5),
    "lung":     (4, -850, 30, 25, 30, 10),
    "lvessel":  (4, 60, 30, 10, 150, 20),
    "heart":    (0, 110, 30, 15, 300, 30),
    "liver":    (1, 60, 8, 6, 560, 20),
    "spleen":   (2, 50, 8, 5, 450, 20),
    "kcortex":  (3, 160, 25, 8, 520, 20),
    "kmedulla": (3, 90, 20, 8, 350, 20),
    "aorta":    (6, 180, 40, 6, 180, 15),
    "marrow":   (5, 250, 40, 20, 700, 40),
    "cortex":   (5, 850, 150, 30, 60, 10),
    "arch":     (5, 450, 80, 30, 300, 30),
    "disc":     (0, 90, 10, 5, 300, 20),
    "csf":      (0, 15, 5, 3, 120, 10),
    "rib":      (0, 400, 80, 40, 350, 30),
    "table":    (0, -250, 50, 5, 0, 0),
}
TISSUES = tuple(_TISSUES)  # index in the tissue map -> name

# ``variation > 0`` only. CT contrast phases: mean HU of the enhancing tissues (hvessel: the intrahepatic
# portal/hepatic veins drawn inside the liver and labelled liver). Liver and spleen overlap across phases
# and swap order between them (arterial spleen > liver, non-contrast liver > spleen), so intensity alone
# cannot tell them apart: position, shape and neighbours must. Values after typical adult abdominal CT.
PHASES = ("non-contrast", "arterial", "portal", "delayed")
_PHASE_HU = {  # tissue: (non-contrast, arterial, portal, delayed)
    "liver":    (58, 75, 110, 90),
    "spleen":   (48, 110, 112, 85),
    "kcortex":  (32, 190, 165, 130),
    "kmedulla": (32, 80, 150, 140),
    "aorta":    (42, 300, 160, 110),
    "heart":    (42, 260, 150, 110),
    "lvessel":  (40, 200, 130, 100),
    "hvessel":  (40, 110, 170, 115),
}
# Organ shape/position jitter at variation 1: log-scale std per semi-axis and shift std (units of A, B, hz).
_ORGAN_JIT = {"liver": (0.15, 0.05), "spleen": (0.25, 0.06), "kidney+1": (0.12, 0.04), "kidney-1": (0.12, 0.04)}
_T = {name: np.uint8(i) for i, name in enumerate(TISSUES)}
_TAB = np.array(list(_TISSUES.values()), dtype=np.float32)  # [n_tissues, 6]
LABEL_OF_TISSUE = _TAB[:, 0].astype(np.uint8)  # [n_tissues]


class _Field:
    """A random field of unit variance and correlation length ~``step`` mm on the grid ``axes`` (ascending
    1D mm coordinates of x, y, z): white noise on a coarse lattice smoothed by separable Gaussian weights.
    ``field(ks)`` evaluates the z-slab ``ks`` as a Fortran-ordered [nx, ny, nk] float32 array for ~``2 * fov /
    step`` flops per voxel, so volumes are built slab by slab without any full-size float temporaries."""

    def __init__(self, rng, axes, step: float):
        ws = []
        for c in axes:
            centres = np.arange(c[0] - 2 * step, c[-1] + 2 * step + 1e-6, step)
            w = np.exp(-0.5 * ((c[:, None] - centres[None, :]) / step) ** 2)  # [n, g]
            w[w < 1e-3] = 0  # compact support: a slab reads only the lattice planes near it
            ws.append((w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32))  # unit variance
        (n0, g0), (n1, g1), (_, g2) = (w.shape for w in ws)
        lattice = rng.standard_normal((g2, g1, g0), dtype=np.float32)  # [gz, gy, gx]
        # einsum, not matmul: numpy's own single-threaded loops give the same bits for any BLAS thread count
        h = np.einsum("yb,zbx->zyx", ws[1], np.einsum("zba,xa->zbx", lattice, ws[0]))  # [gz, ny, nx]
        self.h, self.wz, self.shape = h.reshape(g2, n1 * n0), ws[2], (n0, n1)

    def __call__(self, ks: slice) -> np.ndarray:
        wz = self.wz[ks]  # [nk, gz]
        used = np.nonzero(wz.any(axis=0))[0]
        g = slice(used[0], used[-1] + 1)
        return np.einsum("kg,gn->kn", wz[:, g], self.h[g]).reshape(len(wz), *self.shape[::-1]).T  # [nx, ny, nk]


def _window(coords, lo, hi) -> slice:
    return slice(*np.searchsorted(coords, [lo, hi]))


def _ellipse(sl, x, y, cx, cy, rx, ry, value) -> None:
    """Paint an axis-aligned ellipse into the 2D slice ``sl`` [nx, ny], touching only its bounding box."""
    i, j = _window(x, cx - rx, cx + rx), _window(y, cy - ry, cy + ry)
    sl[i, j][((x[i, None] - cx) / rx) ** 2 + ((y[None, j] - cy) / ry) ** 2 < 1] = value  # [wx, wy] mask


def _organ(t, x, y, z, rng, centre, semi, angle, value, only, inner=None) -> None:
    """Paint a deformed ellipsoid (rotated about z, tapered, lobulated) into the tissue map ``t``
    [nx, ny, nz], inside its bounding box only and only over the tissues ``only``. ``inner=(f, tissue)``
    paints the core (normalised radius^2 < f) with another tissue (renal medulla)."""
    taper, lobe = rng.uniform(-0.3, 0.3, 2), rng.uniform(0.03, 0.1)
    phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(2, 4, 3)
    # Bounding box: a taper stretches y and z by up to 1/0.7, lobulation radii by up to 1/sqrt(0.9).
    c, sn = abs(np.cos(angle)), abs(np.sin(angle))
    rx, ry = 1.1 * c * semi[0] + 1.55 * sn * semi[1], 1.1 * sn * semi[0] + 1.55 * c * semi[1]
    i, j = _window(x, centre[0] - rx, centre[0] + rx), _window(y, centre[1] - ry, centre[1] + ry)
    k = _window(z, centre[2] - 1.55 * semi[2], centre[2] + 1.55 * semi[2])
    if not (i.stop > i.start and j.stop > j.start and k.stop > k.start):
        return
    dx, dy = x[i, None] - centre[0], y[None, j] - centre[1]  # [wx, 1], [1, wy]
    qx = (np.cos(angle) * dx + np.sin(angle) * dy) / semi[0]  # [wx, wy]: in-plane terms are 2D ...
    qy = (-np.sin(angle) * dx + np.cos(angle) * dy) / semi[1]
    qy = qy / np.clip(1 + taper[0] * qx, 0.4, None)  # thinner toward one end (the liver's left lobe)
    rz = 1 / (semi[2] * np.clip(1 + taper[1] * qx, 0.4, None))  # [wx, wy] and shorter toward one end
    lob = lobe * np.sin(freq[0] * qx + phase[0]) * np.sin(freq[1] * qy + phase[1])  # [wx, wy]
    dz = z[k] - centre[2]  # [wz]
    f = np.square(rz[:, :, None] * dz)  # ... and only these few operations are 3D: [wx, wy, wz]
    f += (qx**2 + qy**2)[:, :, None]
    f *= 1 + lob[:, :, None] * np.sin(freq[2] * dz / semi[2] + phase[2])
    win = t[i, j, k]
    m = f < 1
    m &= np.logical_or.reduce([win == o for o in only]) if len(only) > 1 else win == only[0]
    win[m] = value
    if inner is not None:
        win[m & (f < inner[0])] = inner[1]


def _anatomy(rng, fov_scale: float, jit: dict | None = None):
    """Draw one subject's grid and tissue map in world RAS+ (+x = patient's right).
    Returns (tissue [nx, ny, nz] uint8, (x, y, z) mm coordinates, spacing (sx, sy, sz)).
    ``jit`` (``variation > 0`` only): organ name -> (scale [3], shift [3]) applied to that organ's semi-axes
    and centre (shift in units of the body's semi-axes A, B and the half-height hz); ``None`` leaves every
    number, and so every byte, of the default phantoms as it was."""
    s = fov_scale
    fov_xy, fov_z = rng.uniform(200, 260) * s, rng.uniform(150, 300) * s
    sxy, sz = rng.uniform(0.6, 1.0), rng.uniform(1.5, 5.0)
    nxy, nz = max(16, round(fov_xy / sxy)), max(6, round(fov_z / sz))
    x = ((np.arange(nxy) - (nxy - 1) / 2) * sxy).astype(np.float32)  # [nx] mm, toward patient's right
    y = x.copy()  # [ny] mm, toward anterior
    z = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(np.float32)  # [nz] mm, toward superior
    hz = max(abs(z[0]), 1e-3)  # u = z / hz runs from -1 (inferior edge) to +1 (superior edge)

    # Body: a superellipse whose semi-axes and centre drift along z; flatter at the back.
    A = fov_xy / 2 * rng.uniform(0.76, 0.88)  # left-right semi-axis, mm
    B = A * rng.uniform(0.66, 0.8)  # anterior-posterior semi-axis
    cx0, cy0 = rng.uniform(-0.03, 0.03, 2) * fov_xy
    ga, gb, drift = rng.uniform(-0.06, 0.06, 2), rng.uniform(-0.06, 0.06, 2), rng.uniform(-0.02, 0.02) * A
    p, post = rng.uniform(2.0, 2.6), rng.uniform(0.85, 0.95)
    r_fat, r_mus = rng.uniform(0.86, 0.93), rng.uniform(0.88, 0.93)  # inner contours, relative radius
    u_d = rng.uniform(0.2, 0.45)  # diaphragm level; above it is thorax
    r_v = A * rng.uniform(0.12, 0.15)  # vertebral body radius
    y_s = cy0 - post * B * r_fat + rng.uniform(2.8, 3.2) * r_v  # vertebral body centre: posterior elements behind
    period, disc = 30 * s * rng.uniform(0.9, 1.1), rng.uniform(0.15, 0.25)  # vertebra + disc height
    rim = min(max(1.0, 1.2 * sxy), 0.3 * r_v)  # cortical shell, at least about one voxel
    r_a = A * rng.uniform(0.08, 0.11)  # aorta radius
    x_a = -0.45 * r_v + rng.uniform(-0.1, 0.1) * r_v  # left of the midline (patient's left = -x)
    rib_p, rib_w, rib_slope = 26 * s * rng.uniform(0.9, 1.1), 7 * s, rng.uniform(0.2, 0.5)
    z0 = rng.uniform(0, period)
    rib_ok = np.abs(np.arctan2(x[:, None] - cx0, y[None, :] - cy0))  # [nx, ny] angle from anterior
    rib_ok = (rib_ok > np.radians(30)) & (rib_ok < np.radians(150))  # not at the sternum or the spine
    r_in = r_fat * r_mus  # ribs run in the middle half of the muscle wall
    rib_in, rib_out = (r_in + 0.25 * (r_fat - r_in)) ** p, (r_in + 0.75 * (r_fat - r_in)) ** p

    # [nx, ny, nz] tissue indices, Fortran order: each axial slice is contiguous, and NIfTI is F-ordered.
    t = np.zeros((nz, nxy, nxy), dtype=np.uint8).T
    for kk in range(nz):  # one axial slice at a time: cache-friendly, and everything here is a tube along z
        u = z[kk] / hz
        a, b = A * (1 + ga[0] * u + ga[1] * u * u), B * (1 + gb[0] * u + gb[1] * u * u)
        cx = cx0 + drift * u
        bx = (np.abs(x - cx) / a) ** p  # [nx]
        dy = y - cy0
        by = (np.abs(dy) / np.where(dy < 0, post * b, b)) ** p  # [ny]
        q = bx[:, None] + by[None, :]  # [nx, ny]; 1 on the skin
        sl = t[:, :, kk]
        sl[...] = (q < 1).view(np.uint8) + (q < r_fat**p).view(np.uint8) + (q < (r_fat * r_mus) ** p).view(np.uint8)
        # 0 air, 1 subcutaneous fat, 2 muscle wall, 3 cavity (bowel) -- the order of TISSUES
        ys = y_s + 0.03 * A * u * u
        yb = cy0 - post * b * r_fat  # inner edge of the posterior fat
        for side in (-1, 1):  # paraspinal muscles fill the space behind the vertebra
            _ellipse(sl, x, y, cx + side * 1.6 * r_v, (yb + ys - r_v) / 2, 1.1 * r_v,
                     max((ys - r_v - yb) / 2, 0.8 * r_v) + 2 * s, _T["muscle"])
        bone = ((z[kk] - z0) % period) / period >= disc
        _ellipse(sl, x, y, cx, ys - r_v * 1.25, 0.35 * r_v, 0.35 * r_v, _T["csf"])  # spinal canal
        if bone:
            _ellipse(sl, x, y, cx, ys - r_v * 2.1, 0.22 * r_v, 0.55 * r_v, _T["arch"])  # spinous process
            _ellipse(sl, x, y, cx, ys, r_v, 0.85 * r_v, _T["cortex"])
            _ellipse(sl, x, y, cx, ys, r_v - rim, 0.85 * r_v - rim, _T["marrow"])
        else:
            _ellipse(sl, x, y, cx, ys, r_v, 0.85 * r_v, _T["disc"])
        _ellipse(sl, x, y, cx + x_a + 0.03 * A * u, ys + 0.85 * r_v + r_a + 2 * s, r_a, r_a, _T["aorta"])
        if u > u_d - 0.5 * (1 + u_d):  # ribs: oblique (lower in front), in the lateral muscle wall
            ribs = ((z[kk] + rib_slope * dy[None, :] - z0) % rib_p < rib_w) & rib_ok & (q > rib_in) & (q < rib_out)
            sl[ribs] = _T["rib"]

    # The couch under the patient, across most of the field of view.
    y_tab = cy0 - post * B * (1 + abs(gb[0]) + abs(gb[1])) - rng.uniform(3, 15) * s
    rows = _window(y, y_tab - 10 * s, y_tab)
    t[_window(x, -0.45 * fov_xy, 0.45 * fov_xy), rows, :] = _T["table"]

    # Organs in world mm; the abdomen spans u in [-1, u_d], length labd (in units of hz).
    labd, cav = 1 + u_d, [_T["bowel"]]

    def organ(name, centre, semi, *args, **kw):
        if jit is not None:
            scale, shift = jit[name]
            centre = tuple(c + d * h for c, d, h in zip(centre, shift, (A, B, hz)))
            semi = tuple(r * f for r, f in zip(semi, scale))
        _organ(t, x, y, z, rng, centre, semi, *args, **kw)

    ub = u_d - rng.uniform(0.02, 0.08)  # lung base
    for side in (1, -1):
        semi_u = (1 - ub) * 1.4
        _organ(t, x, y, z, rng, (side * 0.47 * A + cx0, cy0 - 0.05 * B, (ub + semi_u) * hz),
               (0.36 * A, 0.8 * B, semi_u * hz), rng.uniform(-0.1, 0.1), _T["lung"], cav)
    hu = u_d + 0.35 * (1 - u_d)
    _organ(t, x, y, z, rng, (cx0 - 0.12 * A, cy0 + 0.3 * B, hu * hz), (0.33 * A, 0.42 * B, 0.4 * (1 - u_d) * hz),
           rng.uniform(-0.4, 0.0), _T["heart"], [_T["bowel"], _T["lung"]])
    sl_u = 0.36 * labd * rng.uniform(0.9, 1.1)  # liver: right upper quadrant, dome under the right lung
    organ("liver", (cx0 + 0.38 * A, cy0 + 0.08 * B, (u_d + 0.06 - sl_u) * hz),
          (0.5 * A, 0.62 * B, sl_u * hz), rng.uniform(-0.2, 0.2), _T["liver"], [_T["bowel"], _T["lung"]])
    organ("spleen", (cx0 - 0.55 * A, cy0 - 0.25 * B, (u_d - 0.2 * labd) * hz),
          (0.14 * A, 0.32 * B, 0.16 * labd * hz), rng.uniform(-0.9, -0.4), _T["spleen"], [_T["bowel"], _T["lung"]])
    for side, level in ((1, 0.62), (-1, 0.55)):  # the right kidney sits lower, under the liver
        organ(f"kidney{side:+d}", (cx0 + side * (r_v + 0.22 * A), y_s + 0.1 * B, (u_d - level * labd) * hz),
              (0.12 * A, 0.17 * A, 0.2 * labd * hz), side * rng.uniform(0.2, 0.6), _T["kcortex"], cav,
              inner=(0.35, _T["kmedulla"]))
    return t, (x, y, z), (float(sxy), float(sxy), float(sz)), u_d


def synth_volume(seed: int, index: int, modality: str = "CT", fov_scale: float = 1.0, variation: float = 0.0) -> dict:
    """One phantom subject, in memory. Returns a dict with ``image`` (stored orientation; CT int16 HU,
    MR float32), ``label`` (uint8, same shape), ``affine`` (4x4), ``axcodes``, ``spacing`` (per stored
    axis, mm), ``tissue`` (uint8 indices into ``TISSUES``, same shape; what every voxel is made of) and
    ``phase`` (the CT contrast phase; ``"portal"`` unless ``variation > 0``).

    ``variation`` in [0, 1] (default 0: today's phantoms, byte for byte) adds inter-subject variation that
    a harder downstream task needs, drawn from a generator of its own so the default draws never move:
    organ size and position (liver, spleen, kidneys), a CT contrast phase per subject (``PHASES``:
    liver and spleen HU overlap and swap order), intrahepatic vessels, stronger organ texture and a
    wider noise range. Strengths scale with ``variation``; the phase and the vessels appear for any
    ``variation > 0``."""
    modality = _check(modality, fov_scale, seed=seed, index=index, variation=variation)
    key = [seed, index, MODALITIES[modality], round(fov_scale * 1000)]
    rng = np.random.default_rng(key)
    vrng = np.random.default_rng([*key, 0x5EED]) if variation > 0 else None  # the opt-in draws only
    jit = None
    if vrng is not None:
        jit = {name: (np.exp(variation * sd * vrng.standard_normal(3)),
                      variation * np.clip(sh * vrng.standard_normal(3), -2.5 * sh, 2.5 * sh))
               for name, (sd, sh) in _ORGAN_JIT.items()}
    t, (x, y, z), spacing, u_d = _anatomy(rng, fov_scale, jit)
    hz = max(abs(z[0]), 1e-3)

    # Random fields, drawn before the slab loop so that every draw happens in a fixed order.
    tex = _Field(rng, (x, y, z), 18 * fov_scale)  # bowel/fat pattern and organ texture
    ves = [_Field(rng, (x, y, z), 8 * fov_scale) for _ in range(2)]  # lung vessels
    low = _Field(rng, (x, y, z), 90 * fov_scale)  # smooth intensity drift / MR bias field
    ct = modality == "CT"
    col = 1 if ct else 4
    jitter = _TAB[:, 2] if ct else 0.08 * _TAB[:, 4]
    base = (_TAB[:, col] + rng.uniform(-1, 1, len(TISSUES)) * jitter).astype(np.float32)  # [n_tissues]
    amp = _TAB[:, 3 if ct else 5].astype(np.float32)  # texture amplitude per tissue
    fat_thr = rng.uniform(-0.9, -0.2)  # visceral fat fraction of the cavity
    drift = rng.uniform(3, 8) if ct else rng.uniform(0.08, 0.15)  # HU per std (CT), bias per std (MR)
    sigma = rng.uniform(10, 25) if ct else rng.uniform(8, 20)  # noise
    psf = np.array([0.1, 0.8, 0.1], dtype=np.float32)  # in-plane blur: softens voxelised edges like a kernel
    lut = np.array([_T["vfat"], _T["bowel"], _T["gas"]], dtype=np.uint8)
    phase, hvessel = "portal", None  # intrahepatic vessel intensity (variation > 0 only)
    if vrng is not None:
        organs = [_T[n] for n in ("liver", "spleen", "kcortex", "kmedulla")]
        amp[organs] *= 1 + 2 * variation  # parenchymal texture: 6 HU -> up to 18 HU
        if ct:
            p = int(vrng.integers(len(PHASES)))
            phase = PHASES[p]
            hu = {n: v[p] + vrng.uniform(-1, 1) * (15 if n in ("liver", "spleen", "hvessel") else 25)
                  for n, v in _PHASE_HU.items()}
            for n, v in hu.items():
                if n in _T:
                    base[_T[n]] = v
            hvessel = hu["hvessel"] - hu["liver"]
            sigma = vrng.uniform(10, 25 + 20 * variation)
        else:  # MR: liver and spleen closer together, varying per subject; vessels dark (flow void-ish)
            base[_T["spleen"]] = base[_T["liver"]] * vrng.uniform(1 - 0.25 * variation, 1 + 0.1 * variation)
            hvessel = -0.5 * base[_T["liver"]]
            sigma = vrng.uniform(8, 20 + 15 * variation)

    img = np.empty(t.shape, dtype=np.int16 if ct else np.float32, order="F")  # [nx, ny, nz]
    step = max(1, (1 << 19) // (t.shape[0] * t.shape[1]))  # slices per slab (~2 MB of float32)
    for k0 in range(0, t.shape[2], step):
        ks = slice(k0, min(k0 + step, t.shape[2]))
        tk = t[:, :, ks]  # [nx, ny, nk] view: edits go into t
        g = tex(ks)  # [nx, ny, nk], unit std
        # Cavity: bowel loops, visceral fat between them, gas pockets; above the diaphragm, mediastinal fat.
        kind = (g > fat_thr).view(np.uint8) + (g > 1.7).view(np.uint8)
        kind[:, :, z[ks] / hz > u_d] = 0
        np.copyto(tk, lut[kind], where=tk == _T["bowel"])
        lung = tk == _T["lung"]
        if lung.any():  # vessels where two independent smooth fields both cross zero: branching tubes
            lung &= np.abs(ves[0](ks)) < 0.27
            lung &= np.abs(ves[1](ks)) < 0.27
            tk[lung] = _T["lvessel"]
        v = base[tk]  # [nx, ny, nk] float32, Fortran order kept by fancy indexing
        v += amp[tk] * g
        if hvessel is not None:  # intrahepatic vessels: other level sets of the lung-vessel fields
            liver = tk == _T["liver"]
            if liver.any():
                liver &= np.abs(ves[0](ks) - 0.9) < 0.22
                liver &= np.abs(ves[1](ks) + 0.9) < 0.22
                v[liver] += hvessel
        for axis in (0, 1):
            v = correlate1d(v, psf, axis=axis, mode="nearest", output=np.empty_like(v))
        noise = rng.standard_normal(v.shape[::-1], dtype=np.float32).T  # [nx, ny, nk]
        if ct:
            v += drift * low(ks)
            v += sigma * noise
            img[:, :, ks] = np.clip(np.rint(v, out=v), -1024, 3071, out=v)
        else:  # multiplicative bias field 0.7..1.3, then Rician noise (magnitude of complex Gaussian noise)
            v *= np.clip(1 + drift * low(ks), 0.7, 1.3)
            v += sigma * noise
            np.square(v, out=v)
            v += np.square(sigma * rng.standard_normal(v.shape[::-1], dtype=np.float32).T)
            img[:, :, ks] = np.sqrt(v, out=v)

    # Store: reorient the world-RAS arrays to this subject's axis codes and carry the affine along.
    codes = ORIENTATIONS[(index + seed) % len(ORIENTATIONS)]
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = x[0], y[0], z[0]  # the volume's centre sits at the world origin
    affine = ras @ inv_ornt_aff(ornt, t.shape)
    out = {"image": apply_orientation(img, ornt), "tissue": apply_orientation(t, ornt)}  # views
    out["label"] = LABEL_OF_TISSUE[out["tissue"]]
    return {**out, "affine": affine, "axcodes": codes, "phase": phase,
            "spacing": tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))}


def _check(modality: str, fov_scale: float, **counts) -> str:
    """Validate arguments with a message that says how to fix them; returns the modality as CT or MR."""
    m = {"CT": "CT", "MR": "MR", "MRI": "MR"}.get(str(modality).upper())
    if m is None:
        raise ValueError(f"modality {modality!r} is not supported: use 'CT' or 'MR'")
    if not 0.2 <= fov_scale <= 2.0:
        raise ValueError(f"fov_scale={fov_scale}: use 0.2..2.0 (0.3-0.5 for tests, 1.0 for adult-sized volumes)")
    variation = counts.pop("variation", 0.0)
    if not (isinstance(variation, (int, float)) and not isinstance(variation, bool) and 0.0 <= variation <= 1.0):
        raise ValueError(f"variation={variation!r}: use 0..1 (0 = the default phantoms, 1 = the hard, varied ones)")
    for name, v in counts.items():
        if isinstance(v, bool) or int(v) != v or v < (1 if name == "n" else 0):
            raise ValueError(f"{name}={v!r}: must be a {'positive' if name == 'n' else 'non-negative'} integer")
    return m


def _nifti_gz(data: np.ndarray, affine: np.ndarray, descrip: str) -> bytes:
    """NIfTI-1 bytes, gzip-compressed with no timestamp or file name (byte-identical on rerun)."""
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm")
    hdr["descrip"] = descrip.encode()[:79]
    raw = bytearray(img.to_bytes())
    # nibabel writes NaN scaling for unscaled data; state "no scaling" explicitly as slope 1, inter 0.
    hdr2 = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    hdr2["scl_slope"], hdr2["scl_inter"] = 1.0, 0.0
    raw[: hdr2.sizeof_hdr] = hdr2.binaryblock
    return gzip.compress(bytes(raw), compresslevel=1, mtime=0)


def _write(path: Path, blob: bytes) -> None:
    part = path.with_name(path.name + ".part")  # not *.nii.gz, so readers never pick up a half file
    part.write_bytes(blob)
    os.replace(part, path)


def synth_dataset(out: str | Path, n: int, seed: int = 0, modality: str = "CT", fov_scale: float = 1.0,
                  progress: bool = True, variation: float = 0.0) -> dict:
    """Write ``n`` phantom subjects as an nnU-Net v2 raw dataset in ``out`` and return its dataset.json.

    ``fov_scale`` shrinks (or grows) the field of view and the anatomy with it; voxel spacing keeps its
    range (0.6-1.0 mm in-plane, 1.5-5 mm slices), so small scales give small volumes for tests.
    Stale ``<prefix>_NNN`` cases from an earlier, larger ``n`` in ``out`` are removed. ``variation`` > 0
    (up to 1) gives the harder, more varied subjects of ``synth_volume``; 0 writes today's files exactly."""
    modality = _check(modality, fov_scale, n=n, seed=seed, variation=variation)
    n, out, prefix = int(n), Path(out), PREFIX[modality]
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    own = re.compile(rf"^{prefix}_(\d+)(_0000)?\.nii\.gz(\.part)?$")
    for f in [*(out / "imagesTr").iterdir(), *(out / "labelsTr").iterdir()]:
        m = own.match(f.name)
        if m and (int(m.group(1)) >= n or f.name.endswith(".part")):
            f.unlink()
    from tqdm import tqdm

    for i in tqdm(range(n), desc=f"synth {modality}", unit="case", disable=not progress):
        case = f"{prefix}_{i:03d}"
        v = synth_volume(seed, i, modality, fov_scale, variation)
        tag = f"medssl synthetic {modality} phantom seed={seed} i={i}" + (f" var={variation:g}" if variation else "")
        _write(out / "imagesTr" / f"{case}_0000.nii.gz", _nifti_gz(v["image"], v["affine"], tag))
        _write(out / "labelsTr" / f"{case}.nii.gz", _nifti_gz(v["label"], v["affine"], tag))

    kind = "contrast-enhanced CT" if modality == "CT" else "T1-like MRI"
    desc = {"name": f"Phantom{modality}",
            "description": f"Synthetic {kind} torso phantom generated by medssl shards.synth (seed={seed}, "
                           f"fov_scale={fov_scale}); not patient data. Regenerate with: python -m medssl.shards synth "
                           f"--out DIR --n {n} --seed {seed} --modality {modality} --fov-scale {fov_scale}"
                           + (f" --variation {variation:g}" if variation else ""),
            "reference": "medssl shards/synth.py", "licence": "CC0-1.0", "channel_names": {"0": modality},
            "labels": dict(LABELS), "numTraining": n, "file_ending": ".nii.gz", "seed": seed}
    if variation:
        desc["variation"] = variation
    (out / "dataset.json").write_text(json.dumps(desc, indent=2) + "\n")
    return desc


def _run_cli(args) -> int:
    try:
        desc = synth_dataset(args.out, args.n, args.seed, args.modality, args.fov_scale, progress=True,
                             variation=getattr(args, "variation", 0.0))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = sorted((Path(args.out) / "imagesTr").glob(f"{PREFIX[desc['channel_names']['0']]}_*_0000.nii.gz"))
    hdrs = [nib.load(str(f)) for f in files]  # headers only: nibabel reads voxels lazily
    sp = np.array([sorted(h.header.get_zooms()[:3]) for h in hdrs])  # [n, 3]: in-plane, in-plane, slice
    orient = Counter("".join(nib.aff2axcodes(h.affine)) for h in hdrs)
    shapes = [h.shape for h in hdrs]
    vox = [int(np.prod(s)) for s in shapes]
    print(f"Wrote {len(files)} synthetic {desc['channel_names']['0']} phantoms ({files[0].name[:-12]} .. "
          f"{files[-1].name[:-12]}) to {Path(args.out).resolve()} in nnU-Net v2 raw layout (imagesTr/, labelsTr/, "
          f"dataset.json); in-plane spacing {sp[:, :2].min():.2f}-{sp[:, :2].max():.2f} mm, slice thickness "
          f"{sp[:, 2].min():.2f}-{sp[:, 2].max():.2f} mm; shapes from {shapes[int(np.argmin(vox))]} to "
          f"{shapes[int(np.argmax(vox))]}; orientations {', '.join(f'{k} x{v}' for k, v in sorted(orient.items()))}; "
          f"labels {', '.join(f'{v} {k}' for k, v in LABELS.items() if v)}. Same arguments give byte-identical files. "
          f"Next: python -m medssl.shards build {args.out} --out SHARDS_DIR")
    return 0


def register_cli(subparsers) -> None:
    """Add ``synth`` to the ``python -m medssl.shards`` sub-commands."""
    import argparse

    p = subparsers.add_parser(
        "synth", help="write synthetic CT/MRI torso phantoms (nnU-Net v2 raw layout) for demos and tests",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write N synthetic torso phantoms as an nnU-Net v2 raw dataset: OUT/imagesTr/<case>_0000.nii.gz,
OUT/labelsTr/<case>.nii.gz and OUT/dataset.json. CT is int16 Hounsfield units (air -1000, fat -100,
muscle +45, liver +60, contrast-enhanced kidney and aorta +150..+180, bone +250 with a dense cortical
rim), with noise and a smooth intensity drift; MR is T1-like float32 with a bias field and Rician noise.
Each subject has its own body shape, organ sizes and positions, anisotropic spacing (0.6-1.0 mm in-plane,
1.5-5 mm slices) and stored orientation (RAS, LPS or slices-first IPL) over the same world anatomy.

Labels (uint8): 0 background, 1 liver, 2 spleen, 3 kidney, 4 lung, 5 spine, 6 aorta. Fat, muscle,
bowel, heart, ribs and the couch are in the image but not labelled.

Deterministic: the same --n/--seed/--modality/--fov-scale give byte-identical files, and subject i
does not depend on --n.""",
        epilog="example: python -m medssl.shards synth --out data/Dataset900_PhantomCT --n 8 --fov-scale 0.6",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write (created)")
    p.add_argument("--n", type=int, default=8, metavar="N", help="number of subjects (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--modality", default="CT", choices=["CT", "MR"], help="CT (HU, int16) or MR (float32) (default CT)")
    p.add_argument("--fov-scale", type=float, default=1.0, metavar="F",
                   help="field-of-view and anatomy scale; 1.0 is adult-sized (~200-260 mm in-plane), "
                        "0.3-0.5 gives tiny volumes for tests (default 1.0)")
    p.add_argument("--variation", type=float, default=0.0, metavar="V",
                   help="0..1: inter-subject variation for a harder downstream task -- organ size and position, a CT "
                        "contrast phase per subject (liver and spleen HU overlap), liver vessels, stronger texture "
                        "and noise (default 0: the standard phantoms, unchanged)")
    p.set_defaults(func=_run_cli)
