"""results.csv, results.md and the plots: per-run rows, means over seeds, paired bootstrap intervals against
the scratch baseline of the same network."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from .spec import Ablation, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, DONE, LOG, _fmt_value, safe_name
from .runner import _now, _say, final_loss, plan, pretext_losses, read_json, status, write_text


# ============================================================================================ statistics
def paired_interval(diffs, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its percentile bootstrap interval. Each resample
    draws ``len(diffs)`` pairs with replacement (``numpy.random.default_rng(seed).integers``, one
    ``[resamples, n]`` draw), so the interval is reproducible."""
    import numpy as np

    d = np.asarray(list(diffs), dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))  # [B, n]
    means = d[idx].mean(axis=1)  # [B]
    a = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [a, 100 - a])
    return float(d.mean()), float(low), float(high)


def case_means(metrics: dict) -> dict:
    """Per test case, the mean foreground Dice (classes absent from both truth and prediction left out)."""
    out = {}
    for key, case in (metrics.get("cases") or {}).items():
        vals = [v for v in (case.get("dice") or {}).values() if isinstance(v, (int, float)) and v == v]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def paired_diffs(pairs: list[tuple[dict, dict]]) -> tuple[list[float], list[str]]:
    """Differences pretrained − scratch over every (seed, test case) pair; notes on pairs that do not fit."""
    diffs, notes = [], []
    for a, b in pairs:
        if (a.get("split") or {}).get("test") != (b.get("split") or {}).get("test"):
            notes.append(f"seed {a.get('seeds', {}).get('train')}: test sets differ, not paired")
            continue
        ca, cb = case_means(a), case_means(b)
        for k in sorted(set(ca) & set(cb)):
            diffs.append(ca[k] - cb[k])
    return diffs, notes


# ============================================================================================ results
def _fnum(v, nd: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def collect(abl: Ablation, out: Path, say=None) -> dict:
    """results.csv, results.md and the two plots from whatever the run folders hold (atomic writes)."""
    say = say or _say
    import numpy as np

    out = Path(out).resolve()
    p = plan(abl, out)
    ft_cfg = abl.data["ft_config"]
    pre_by_cell = {e["cell"]: e for e in p["pretrain"]}
    pre_info = {}
    for e in p["pretrain"]:
        st, why = status(e)
        done = read_json(Path(e["dir"]) / DONE) or {}
        pre_info[e["cell"]] = {"status": st, "why": why, "steps": done.get("steps") if st == "done" else None,
                               "wall_s": done.get("wall_s") if st == "done" else None,
                               "loss": final_loss(Path(e["dir"])) if st == "done" else None}
    rows, metrics = [], {}
    classes: list = []
    for e in p["finetune"]:
        st, why = status(e)
        m = read_json(Path(e["dir"]) / "metrics.json") if st == "done" else None
        if m:
            metrics[e["id"]] = m
            classes += [c for c in m.get("dice", {}) if c not in classes]
        rows.append((e, st, why, m))
    hd95 = bool(ft_cfg.eval.hd95)
    head = ["run", "cell", "recipe", "overrides", "init", "network", "n_train", "seed", "pretrain_steps",
            "pretrain_wall_s", "pretext_loss", *[f"dice_{c}" for c in classes], "mean_dice",
            *([f"hd95_{c}" for c in classes] + ["mean_hd95"] if hd95 else []), "status", "folder"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for e, st, why, m in rows:
        pre = pre_by_cell.get(e["cell"]) if e["init"] == "pretrained" else None
        info = pre_info.get(e["cell"], {}) if pre else {}
        dice = (m or {}).get("dice", {})
        hd = {}
        if m and hd95:
            for c in classes:
                vals = [case.get("hd95", {}).get(c) for case in m.get("cases", {}).values()]
                vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
                hd[c] = sum(vals) / len(vals) if vals else None
        hd_vals = [v for v in hd.values() if v is not None]
        w.writerow([e["id"], e["cell"], pre["recipe"] if pre else "",
                    json.dumps(pre["overrides"], separators=(",", ":")) if pre else "", e["init"], e["network"],
                    e["n_train"], e["seed"], info.get("steps") or "", _fnum(info.get("wall_s"), 1),
                    _fnum(info.get("loss"), 5), *[_fnum(dice.get(c), 4) for c in classes],
                    _fnum((m or {}).get("mean_dice"), 4),
                    *([_fnum(hd.get(c), 2) for c in classes] + [_fnum(sum(hd_vals) / len(hd_vals), 2) if hd_vals else ""]
                      if hd95 else []),
                    st if st != "failed" else f"failed: {why}", _shown(e["dir"])])
    write_text(out / "results.csv", buf.getvalue())

    # ---- per cell and n_train: mean ± std over seeds, the paired difference to scratch ------------------
    by_cell: dict = {}
    for e, st, why, m in rows:
        by_cell.setdefault((e["cell"], e["n_train"]), {})[e["seed"]] = (e, m)
    scratch_of = {c.name: f"scratch-{safe_name(c.network)}" for c in abl.cells}
    order = [c.name for c in abl.cells] + sorted(set(scratch_of.values()))
    summary: dict = {}
    for (cell, n), seeds in by_cell.items():
        vals = [m["mean_dice"] for e, m in seeds.values() if m and m.get("mean_dice") is not None]
        s = {"mean": float(np.mean(vals)) if vals else None,
             "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "seeds": len(vals),
             "of": len(seeds), "delta": None}
        if cell in scratch_of:
            ref = by_cell.get((scratch_of[cell], n), {})
            pairs = [(m, ref[sd][1]) for sd, (e, m) in sorted(seeds.items()) if m and sd in ref and ref[sd][1]]
            diffs, notes = paired_diffs(pairs)
            if diffs:
                mean, lo, hi = paired_interval(diffs)
                s["delta"] = {"mean": mean, "low": lo, "high": hi, "pairs": len(diffs), "seeds": len(pairs),
                              "excludes_zero": lo > 0 or hi < 0, "notes": notes}
        summary[(cell, n)] = s
    lines = [f"# Ablation `{abl.name}`", "",
             f"From `{_shown(abl.file)}` on {_now()}. Pretraining: {len(abl.cells)} cell(s), "
             f"{', '.join(sorted({str(c.steps) for c in abl.cells}, key=int))} steps"
             f"{' (preset ' + abl.pre['preset'] + ')' if abl.pre.get('preset') else ''}, {abl.pre['nproc']} process(es), "
             f"seed {abl.pre['seed']}. Fine-tuning on `{_shown(abl.dataset)}` ({abl.data['volumes']} labelled volumes, "
             f"{abl.data['test']} test / {abl.data['val']} validation per split): {abl.ft['steps']} steps"
             f"{' (preset ' + abl.ft['preset'] + ')' if abl.ft.get('preset') else ''}, n_train {abl.ft['n_train']}, "
             f"seeds {abl.ft['seeds']} (each seed sets train.seed and "
             f"{'data.split_seed' if abl.ft['vary_split'] else 'not the split: data.split_seed 0'}).", "",
             "Mean test Dice = the mean over foreground classes and test volumes of one run; ± is the standard "
             "deviation over seeds. Δ vs scratch: pretrained − scratch (same network, n_train and seed: same split and "
             "decoder init), per test volume its mean foreground Dice, averaged over every (seed, test volume) pair; "
             f"95 % percentile bootstrap over those pairs ({BOOTSTRAP_RESAMPLES} resamples, generator seed "
             f"{BOOTSTRAP_SEED}). The pairs are resampled as if independent; test volumes of one seed share a trained "
             "model, so the interval is narrower than one over seeds alone. ★ = the highest mean Dice at that n_train.",
             "",
             "| n_train | cell | recipe | settings | network | seeds | mean Dice ± std | Δ vs scratch [95 % CI] | "
             "CI excludes 0 |", "|---|---|---|---|---|---|---|---|---|"]
    for n in abl.ft["n_train"]:
        present = [(c, summary[(c, n)]) for c in order if (c, n) in summary]
        best = max((s["mean"] for _, s in present if s["mean"] is not None), default=None)
        for cell, s in present:
            c = next((x for x in abl.cells if x.name == cell), None)
            star = " ★" if best is not None and s["mean"] == best else ""
            mean = "–" if s["mean"] is None else (f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None
                                                   else f"{s['mean']:.3f} ± –")
            dl = s["delta"]
            delta = "–" if not dl else f"{dl['mean']:+.3f} [{dl['low']:+.3f}, {dl['high']:+.3f}] ({dl['pairs']} pairs)"
            excl = ("–" if not dl else "**yes**, better" if dl["low"] > 0 else "**yes**, worse" if dl["high"] < 0
                    else "no")
            settings = ", ".join(f"{k}={_fmt_value(v)}" for k, v in (c.settings if c else {}).items()) or "–"
            name = f"**{cell}**{star}" if star else cell
            net = c.network if c else cell.removeprefix("scratch-")
            lines.append(f"| {n} | {name} | {c.recipe if c else 'scratch'} | {settings} | {net} | {s['seeds']}/{s['of']} "
                         f"| {mean} | {delta} | {excl} |")
    lines.append("")
    problems = []
    for e in p["pretrain"]:
        info = pre_info[e["cell"]]
        if info["status"] != "done":
            problems.append(f"- `{e['id']}`: {info['status']}" + (f": {info['why']}" if info["why"] else "")
                            + (f" (log `{Path(e['dir']) / LOG}`)" if info["status"] == "failed" else ""))
    for e, st, why, m in rows:
        if st != "done":
            problems.append(f"- `{e['id']}`: {st}" + (f": {why}" if why else "")
                            + (f" (log `{Path(e['dir']) / LOG}`)" if st == "failed" else ""))
    notes = sorted({n for s in summary.values() if s["delta"] for n in s["delta"]["notes"]})
    if problems or notes:
        lines += ["## Failed, skipped or missing runs", "", *problems, *[f"- note: {n}" for n in notes], ""]
    pre_rows = [f"| {e['cell']} | {e['recipe']} | {i['status']} | {i['steps'] or '–'} | {_fnum(i['wall_s'], 0) or '–'} "
                f"| {_fnum(i['loss'], 4) or '–'} |" for e in p["pretrain"] for i in [pre_info[e["cell"]]]]
    lines += ["## Pretraining", "", "| cell | recipe | status | steps | wall s | final pretext loss (mean of the last 10 logged, last stage) |",
              "|---|---|---|---|---|---|", *pre_rows, ""]
    plots = _plots(abl, p, summary, order, out)
    for png, caption in plots:
        lines += [f"![{caption}]({png})", ""]
    write_text(out / "results.md", "\n".join(lines))
    say(f"results: {out / 'results.csv'} ({len(rows)} rows), {out / 'results.md'}"
        + "".join(f", {out / png}" for png, _ in plots))
    return {"summary": summary, "rows": rows}


def _shown(path: str) -> str:
    """A path as the reader typed it: relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _plots(abl: Ablation, p: dict, summary: dict, order: list, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    shown = [c for c in order if any((c, n) in summary and summary[(c, n)]["mean"] is not None
                                     for n in abl.ft["n_train"])]
    for k, cell in enumerate(shown):
        pts = [(n, summary[(cell, n)]) for n in abl.ft["n_train"] if (cell, n) in summary and summary[(cell, n)]["mean"]
               is not None]
        dodge = 2 ** (0.05 * (k - (len(shown) - 1) / 2))  # side by side, so that error bars do not hide each other
        xs = [n * dodge for n, _ in pts]
        ax.errorbar(xs, [s["mean"] for _, s in pts], yerr=[s["std"] or 0.0 for _, s in pts], marker="o", capsize=3,
                    linestyle="--" if cell.startswith("scratch") else "-", label=cell)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(abl.ft["n_train"]) / 1.6, max(abl.ft["n_train"]) * 1.6)
        ax.set_xticks(abl.ft["n_train"], [str(n) for n in abl.ft["n_train"]])
        ax.set_xlabel("labelled training volumes")
        ax.set_ylabel("mean test Dice (error bars: std over seeds)")
        ax.set_title(f"{abl.name}: Dice vs labelled volumes (dashed: scratch)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out / "dice_vs_n_train.png")
        made.append(("dice_vs_n_train.png", "mean test Dice vs labelled volumes"))
    plt.close(fig)
    curves = {}
    for e in p["pretrain"]:
        rows = pretext_losses(Path(e["dir"]))
        if rows:
            curves.setdefault(e["recipe"], []).append((e["cell"], rows))
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(max(7.0, 5.5 * len(curves)), 4.2), squeeze=False)
        for ax, (recipe, cs) in zip(axes[0], sorted(curves.items())):
            for cell, rows in cs:
                steps, vals = [s for s, _ in rows], [v for _, v in rows]
                line, = ax.plot(steps, vals, linewidth=0.6, alpha=0.35)
                w = max(1, len(vals) // 10)  # a running mean over ~10 % of the curve: the trend through the noise
                smooth = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
                ax.plot(steps, smooth, color=line.get_color(), linewidth=1.6, label=cell)
            ax.set_title(recipe)
            ax.set_xlabel("step")
            ax.set_ylabel("pretext loss")
            ax.legend(fontsize=7)
        fig.suptitle("pretext loss per cell, one panel per recipe (thin: as logged; thick: running mean)", fontsize=10)
        fig.tight_layout()
        _save(fig, out / "pretext_loss.png")
        plt.close(fig)
        made.append(("pretext_loss.png", "pretext loss curves, one panel per recipe"))
    return made


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
