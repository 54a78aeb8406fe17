"""``--dry-run``: what a configuration builds, before a cluster job is queued.

A table of parameters per part (the backbone, each pretrained component or decoder, the class head, the total) and
the shape each decoder level produces for one crop, printed and written as ``model_summary.json``. The shapes come
from a forward pass on the meta device (no memory, no compute), after the real network has been built and counted.
Used by ``medssl pretrain RECIPE … --dry-run`` and ``medssl finetune … --dry-run``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

SUMMARY_FILE = "model_summary.json"


def parameter_parts(model: nn.Module) -> list[dict]:
    """One row per top-level part of ``model`` (children in definition order, then direct parameters), a part's
    ``head`` submodule split into its own row (``decoder.head``); parts without parameters left out."""
    rows = []
    for name, child in model.named_children():
        head = getattr(child, "head", None) if name != "head" else None
        heads = list(head.parameters()) if isinstance(head, nn.Module) else []
        ids = {id(p) for p in heads}
        body = [p for p in child.parameters() if id(p) not in ids]
        for part, params in ((name, body), (f"{name}.head", heads)):
            n = sum(p.numel() for p in params)
            if n:
                rows.append({"part": part, "parameters": n, "trainable": sum(p.numel() for p in params if p.requires_grad)})
    for name, p in model.named_parameters(recurse=False):  # tokens owned by the model itself (a mask token)
        rows.append({"part": name, "parameters": p.numel(), "trainable": p.numel() if p.requires_grad else 0})
    return rows


def level_shapes(model: nn.Module, levels: Sequence[tuple[str, nn.Module]], run: Callable[[torch.Tensor], object],
                 input_shape: Sequence[int]) -> list[dict]:
    """The output shape of each ``levels`` module when ``run`` is given one meta tensor of ``input_shape``.
    ``model`` is moved to the meta device first: call this last (its weights are gone afterwards)."""
    model.to("meta")
    shapes: list[dict] = []

    def hook(name):
        def record(_module, _inputs, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            shapes.append({"level": name, "shape": list(t.shape)})
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in levels]
    try:
        with torch.no_grad():
            run(torch.empty(*input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return shapes


def summary_text(summary: dict) -> str:
    rows = summary["parameters"]
    width = max([len(r["part"]) for r in rows] + [5])
    lines = [f"{'part':<{width}}  {'parameters':>14}  {'trainable':>14}"]
    lines += [f"{r['part']:<{width}}  {r['parameters']:>14,}  {r['trainable']:>14,}" for r in rows]
    lines.append(f"{'total':<{width}}  {summary['total']:>14,}  {summary['trainable']:>14,}")
    if summary.get("levels"):
        lines.append(f"\ndecoder levels for one crop {summary['input']}:")
        w = max(len(lv["level"]) for lv in summary["levels"])
        lines += [f"  {lv['level']:<{w}}  {lv['shape']}" for lv in summary["levels"]]
    return "\n".join(lines)


def summarize(model: nn.Module, levels, run, input_shape, out: str | Path | None, **about) -> dict:
    """Count ``model``'s parameters per part, trace ``levels`` on the meta device, write ``out/model_summary.json``
    (when ``out`` is given) and return the summary; ``about`` (recipe, backbone, …) goes in as it is."""
    rows = parameter_parts(model)
    summary = {**about, "input": list(input_shape), "parameters": rows,
               "total": sum(p.numel() for p in model.parameters()),
               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    summary["levels"] = level_shapes(model, levels, run, input_shape) if levels else []
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out) / f".{SUMMARY_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(Path(out) / SUMMARY_FILE)
    return summary
