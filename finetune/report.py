"""``report.md``: test Dice per class for several fine-tuning runs side by side, with their overlays.

Rows compare like with like: a run whose data, split, network or steps differ from the first complete
run is flagged in its row and listed under the table; a folder without ``metrics.json`` is listed as
incomplete."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_metrics(run: str | Path) -> dict | None:
    """The run's metrics, or None when it has none (not finished, or not a fine-tuning run)."""
    path = Path(run) / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _fmt(v) -> str:
    return "–" if v is None or v != v else f"{v:.3f}"


def network(m: dict) -> str:
    """``backbone + decoder`` of a run (older runs: the decoder only)."""
    net = m.get("network") or {}
    bb = (net.get("backbone") or {}).get("name")
    return f"{bb} + {m['arch']}" if bb else str(m.get("arch"))


def comparison(m: dict, ref: dict) -> list[str]:
    """What makes ``m`` not comparable with ``ref``: data, split, network, steps."""
    why = []
    if m.get("dataset") != ref.get("dataset"):
        why.append("data")
    if m.get("split", {}).get("test") != ref.get("split", {}).get("test") or \
            m.get("split", {}).get("val") != ref.get("split", {}).get("val"):
        why.append("split")
    if network(m) != network(ref):
        why.append("network")
    if m.get("steps") != ref.get("steps"):
        why.append("steps")
    return why


def dice_table(runs: list[str | Path]) -> str:
    """A Markdown table: one row per run, one column per class + mean, the network, and a flag when the
    row is not comparable with the first complete run."""
    ms = [load_metrics(r) for r in runs]
    done = [m for m in ms if m is not None]
    ref = done[0] if done else None
    classes = list(dict.fromkeys(c for m in done for c in m["dice"]))
    head = ("| run | init | network | train vols | steps | " + " | ".join(classes)
            + " | **mean** | best val (step) | comparable |")
    rows = [head, "|" + "---|" * (len(classes) + 8)]
    for r, m in zip(runs, ms):
        if m is None:
            rows.append(f"| {Path(r).name} | – | – | – | – | " + " | ".join("–" for _ in classes)
                        + " | – | – | incomplete (no metrics.json) |")
            continue
        why = comparison(m, ref)
        rows.append(f"| {Path(r).name} | {m['init']} | {network(m)} | {len(m['split']['train'])} | {m['steps']} | "
                    + " | ".join(_fmt(m["dice"].get(c)) for c in classes)
                    + f" | **{_fmt(m['mean_dice'])}** | {_fmt(m['best']['dice'])} ({m['best']['step']}) | "
                    + ("yes" if not why else "**no**: other " + ", ".join(why)) + " |")
    return "\n".join(rows)


def write_report(runs: list[str | Path], out: str | Path, title: str = "medssl fine-tuning report",
                 preface: str = "") -> str:
    """Write ``out`` (Markdown with the table and the overlays, paths relative to it); returns the table."""
    out = Path(out)
    ms = [load_metrics(r) for r in runs]
    done = [(r, m) for r, m in zip(runs, ms) if m is not None]
    if not done:
        raise FileNotFoundError(f"none of {', '.join(map(str, runs))} holds metrics.json (no finished fine-tuning run)")
    table = dice_table(runs)
    first = done[0][1]
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface, ""]
    lines += [f"Test Dice per class ({first['dice_space']} space: predictions resampled onto each test image's own "
              f"grid and scored against its label file), {len(first['cases'])} held-out volume(s) of "
              f"`{first['dataset']}`. Same split (seed {first['seeds']['split']}) and seeds for every run; "
              f"decoder init digests: " + ", ".join(f"`{m['decoder_init_digest']}`" for _, m in done) + ".", "",
              table, ""]
    odd = [(r, comparison(m, first)) for r, m in done if comparison(m, first)]
    missing = [r for r, m in zip(runs, ms) if m is None]
    for r, why in odd:
        lines.append(f"- **not comparable**: {Path(r).name} differs from {Path(done[0][0]).name} in "
                     f"{', '.join(why)}")
    for r in missing:
        lines.append(f"- **incomplete**: {r} has no metrics.json (still training, stopped, or not a fine-tuning run)")
    if odd or missing:
        lines.append("")
    for r, m in done:
        lines += [f"## {Path(r).name} ({m['init']})", "",
                  f"- export: `{m['export']}`; network: {network(m)}; {m['steps']} steps, global batch "
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
