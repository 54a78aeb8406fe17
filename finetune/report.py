"""``report.md``: test Dice per class for several fine-tuning runs side by side, with their overlays."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_metrics(run: str | Path) -> dict:
    path = Path(run) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run} is not a finished fine-tuning run")
    return json.loads(path.read_text())


def _fmt(v) -> str:
    return "–" if v is None or v != v else f"{v:.3f}"


def dice_table(runs: list[str | Path]) -> str:
    """A Markdown table: one row per run, one column per class + mean."""
    ms = [load_metrics(r) for r in runs]
    classes = list(dict.fromkeys(c for m in ms for c in m["dice"]))
    head = "| run | init | train vols | steps | " + " | ".join(classes) + " | **mean** | best val (step) |"
    rows = [head, "|" + "---|" * (len(classes) + 6)]
    for r, m in zip(runs, ms):
        rows.append(f"| {Path(r).name} | {m['init']} | {len(m['split']['train'])} | {m['steps']} | "
                    + " | ".join(_fmt(m["dice"].get(c)) for c in classes)
                    + f" | **{_fmt(m['mean_dice'])}** | {_fmt(m['best']['dice'])} ({m['best']['step']}) |")
    return "\n".join(rows)


def write_report(runs: list[str | Path], out: str | Path, title: str = "medssl fine-tuning report",
                 preface: str = "") -> str:
    """Write ``out`` (Markdown with the table and the overlays, paths relative to it); returns the table."""
    out = Path(out)
    ms = [load_metrics(r) for r in runs]
    table = dice_table(runs)
    first = ms[0]
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface, ""]
    lines += [f"Test Dice per class ({first['dice_space']} space: predictions resampled onto each test image's own "
              f"grid and scored against its label file), {len(first['cases'])} held-out volume(s) of "
              f"`{first['dataset']}`. Same split (seed {first['seeds']['split']}) and seeds for every run; "
              f"decoder init digests: " + ", ".join(f"`{m['decoder_init_digest']}`" for m in ms) + ".", "", table, ""]
    for r, m in zip(runs, ms):
        lines += [f"## {Path(r).name} ({m['init']})", "",
                  f"- export: `{m['export']}`; network: {m['arch']}; {m['steps']} steps, global batch "
                  f"{m['global_batch']}, {m['train_steps_per_s']:.2f} steps/s; test {m['test_volumes_per_s']:.2f} "
                  "volumes/s (sliding window + resampling)",
                  f"- weights: {len(m['load_report']['loaded'])} tensors loaded, {len(m['load_report']['new'])} new"
                  + (f"; {'; '.join(m['load_report']['notes'])}" if m['load_report']['notes'] else ""), ""]
        for key, case in m["cases"].items():
            if case.get("overlay"):
                rel = os.path.relpath(Path(case["overlay"]).resolve(), out.parent.resolve())
                dice = ", ".join(f"{c} {_fmt(v)}" for c, v in case["dice"].items())
                lines += [f"**{key}** — {dice}", "", f"![{key} {m['init']}]({rel})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return table
