"""``--dry-run``'s time estimate: a measured pretraining and fine-tuning step per cell, plus start-up costs."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from .spec import Ablation, DIST_STEP_S, PREPARE_S_PER_VOLUME, START_PER_PROCESS_S, START_S, _ft_network
from .runner import read_json, status


# ============================================================================================ estimate
def _time_it(fn, repeats: int = 2) -> float:
    fn()  # warm-up (allocations, lazy inits)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(abl: Ablation) -> dict:
    """Seconds per optimizer step of every cell (pretraining) and network (fine-tuning), measured here: the task
    (or segmentation network) built for real, forward + backward + optimizer step on a random batch."""
    import torch

    from ..backbones import build_backbone
    from ..config import task_class
    from ..train import make_optimizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res = {"device": dev.type, "pretrain": {}, "finetune": {}, "window": {}, "threads": torch.get_num_threads()}
    for c in abl.cells:
        cfg = c.config
        torch.manual_seed(0)
        backbone = build_backbone(cfg.model.backbone, img_size=tuple(cfg.data.crop_size), **cfg.model.kwargs)
        task = task_class(cfg.recipe)(backbone, cfg.task).to(dev).train()
        opt = make_optimizer(task.param_groups(cfg.optim.weight_decay), cfg)
        chans = int(cfg.model.kwargs.get("in_chans", 1))
        mb = cfg.train.micro_batch
        batch_n = mb if (dev.type == "cuda" or mb * math.prod(cfg.data.crop_size) <= 4 * 64 ** 3) else 1
        x = torch.rand(batch_n, chans, *cfg.data.crop_size, device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            task({"image": x, "key": ["x"] * batch_n})["loss"].backward()
            opt.step()
            sync()

        res["pretrain"][c.name] = _time_it(step) * mb / batch_n * cfg.train.grad_accum
        res.setdefault("data", {})[c.name] = _time_data(cfg) * cfg.train.grad_accum
    ft_cfg = abl.data["ft_config"]
    n_classes = max(abl.data["classes"] or {1: "x"}) + 1
    seen = {}
    for c in abl.cells:
        if c.net_key in seen:
            res["finetune"][c.network], res["window"][c.network] = seen[c.net_key]
            continue
        model = _ft_network(c, ft_cfg, n_classes).to(dev)
        chans = int(c.config.model.kwargs.get("in_chans", 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mb = ft_cfg.train.micro_batch
        x = torch.rand(mb, chans, *ft_cfg.data.crop_size, device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).float().logsumexp(1).mean().backward()
            opt.step()
            sync()

        xs = torch.rand(ft_cfg.eval.sw_batch, chans, *ft_cfg.data.crop_size, device=dev)

        def window():
            with torch.no_grad():
                model.eval()
                model(xs)
                model.train()
            sync()

        seen[c.net_key] = (_time_it(step) * ft_cfg.train.grad_accum, _time_it(window) / ft_cfg.eval.sw_batch)
        res["finetune"][c.network], res["window"][c.network] = seen[c.net_key]
    return res


def _time_data(cfg, batches: int = 4) -> float:
    """Seconds per micro-batch of the cell's real stream (decode, crops, augmentation), read in this process."""
    import copy

    import torch

    from ..engine import DistEnv
    from ..train import make_stream

    c = copy.deepcopy(cfg)
    c.data.num_workers = 0
    c.data.crop_device = "cpu"  # timed here, on this machine's CPU: the workers' path
    try:
        it = iter(make_stream(c, DistEnv(0, 1, 0, torch.device("cpu")), 0))
        next(it)  # the first volumes: decode + pool
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - t) / batches
    except Exception:  # noqa: BLE001 - an estimate: leave the data out rather than fail the dry run
        return 0.0


def _windows_per_volume(abl: Ablation) -> float:
    """Mean sliding windows per prepared labelled volume (headers only: shape × voxel size / target spacing)."""
    ft = abl.data["ft_config"]
    spacing = None
    idx = read_json(Path(abl.shards[0]) / "index.json") or {}
    sp = (idx.get("config") or {}).get("spacing")
    with contextlib.suppress(TypeError, ValueError):
        spacing = [float(sp)] * 3 if isinstance(sp, (int, float, str)) else [float(v) for v in sp]
    roi, step = ft.data.crop_size, [max(1, int(r * (1 - ft.eval.overlap))) for r in ft.data.crop_size]
    counts = []
    try:
        import nibabel as nib

        for src in abl.data["sources"][:20]:
            if not src.images:
                continue
            h = nib.load(src.images[0]).header
            shape, zooms = h.get_data_shape()[:3], h.get_zooms()[:3]
            size = [s * z / (spacing[i] if spacing else z) for i, (s, z) in enumerate(zip(shape, zooms))]
            counts.append(math.prod(1 + max(0, math.ceil((s - r) / st)) for s, r, st in zip(size, roi, step)))
    except Exception:  # noqa: BLE001 - an estimate: fall back to a guess
        pass
    return sum(counts) / len(counts) if counts else 8.0


def estimate(abl: Ablation, p: dict, meas: dict, jobs: int = 1) -> dict:
    """Seconds per run and in all, here: pretraining one run after another, fine-tuning ``jobs`` at a time
    (their start-ups overlap; their steps share the cores). Runs already done count 0."""
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    ft = abl.data["ft_config"]
    wins = _windows_per_volume(abl)

    def crowd(nproc):  # processes × threads beyond the cores share them
        return 1.0 if meas["device"] == "cuda" else max(1.0, nproc * threads / cores)

    per = {}
    for e, c in zip(p["pretrain"], abl.cells):
        compute, data = meas["pretrain"][e["cell"]], meas["data"][e["cell"]]
        workers = max(1, c.config.data.num_workers)
        if meas["device"] == "cuda":  # the loader workers prepare the next batch while the GPU computes
            step = max(compute, data / workers)
        else:  # each process computes on its share of the cores (measured on meas["threads"]); several
            # processes also all-reduce over gloo
            share = max(1, cores // e["nproc"])
            step = compute * max(1.0, meas.get("threads", share) / share) + data / max(1, min(workers, cores))
            step += DIST_STEP_S if e["nproc"] > 1 else 0.0
        per[e["id"]] = START_S["pretrain"] + START_PER_PROCESS_S * (e["nproc"] - 1) + c.steps * step
    evals = math.ceil(abl.ft["steps"] / ft.train.eval_every) if abl.data["val"] else 0
    vols = abl.data["test"] + abl.data["val"]
    fixed = {}
    for e in p["finetune"]:
        step, win = meas["finetune"][e["network"]], meas["window"][e["network"]]
        fixed[e["id"]] = START_S["finetune"] + PREPARE_S_PER_VOLUME * (e["n_train"] + vols)
        per[e["id"]] = fixed[e["id"]] + ((abl.ft["steps"] * step + (evals * abl.data["val"] + abl.data["test"]) * wins
                                          * win) * crowd(e["nproc"]))
    by_id = {e["id"]: e for e in p["pretrain"] + p["finetune"]}
    todo = {k: v for k, v in per.items() if status(by_id[k])[0] != "done"}
    pre = sum(v for k, v in todo.items() if k.startswith("pretrain/"))
    ft_ids = [k for k in todo if k.startswith("finetune/")]
    ft_wall = sum(todo[k] for k in ft_ids)
    if jobs > 1 and ft_ids and meas["device"] != "cuda":
        ft_wall -= sum(fixed[k] for k in ft_ids) * (1 - 1 / min(jobs, len(ft_ids)))
    elif jobs > 1 and ft_ids:  # one GPU per run: the runs themselves overlap
        ft_wall /= min(jobs, len(ft_ids))
    return {"per_run": per, "total": pre + ft_wall, "pretrain": pre, "finetune": ft_wall, "windows": wins}


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
