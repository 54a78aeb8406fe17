"""``python -m medssl.pretrain ablate FILE``: which pretext task helps my segmentation task? One command, one
table, error bars.

    python -m medssl.pretrain ablate recipes/ablations/NAME.yaml [--out DIR]  run here ([--jobs N] fine-tunings at once)
    python -m medssl.pretrain ablate FILE [--out DIR] --dry-run                 the plan + a measured time estimate
    python -m medssl.pretrain ablate FILE [--out DIR] --slurm                   sbatch arrays + submit.sh
    python -m medssl.pretrain ablate FILE [--out DIR] --collect                 results.csv / results.md / plots

An ablation file (``recipes/ablations/*.yaml``) names pretraining *cells* (a recipe + overrides, listed or
expanded from a grid), the unlabelled shard sets, the labelled downstream dataset and the fine-tuning budget.
Every cell is pretrained once (``OUT/pretrain/<cell>/``, the pretraining command line's own run folder) and its
export fine-tuned for every labelled-set size × seed (``OUT/finetune/<cell>/n<k>-s<seed>/``). For every network
among the cells the same fine-tuning runs start from scratch (``OUT/finetune/scratch-<network>/…``: the same
network, nothing loaded). A pretrained run and its scratch run with equal ``n_train`` and seed share the split and
the decoder init (``train.seed`` = ``data.split_seed`` = seed), so the table compares them pair by pair.

Schema (relative paths are read from the working directory the command runs in, not from the file's folder)::

    name: my_ablation                 # optional (default: the file name); OUT defaults to ablations/<name>
    shards: [demo/shards]             # unlabelled shard sets of every cell (a cell may name its own)
    dataset: demo/raw/Dataset902_...  # labelled data for fine-tuning (nnU-Net/MSD folder, CSV or labelled shards)
    pretrain:
      preset: tiny                    # recipe preset (optional)
      steps: 100                      # optimizer steps per cell
      nproc: 1                        # processes per run (>1: python -m torch.distributed.run --standalone)
      seed: 0                         # train.seed of every cell
      overrides: {train.log_every: 1} # dotted overrides of every cell (before the cell's own)
      timeout: 86400                  # seconds a run may take before it is stopped (checkpoint kept)
    finetune:
      preset: tiny                    # fine-tuning preset (optional)
      steps: 60
      nproc: 1
      overrides: {data.crop_size: [48, 48, 48]}
      n_train: [1, 2, 4]              # labelled training volumes
      seeds: [0, 1, 2]                # train.seed and data.split_seed of each fine-tuning run
      vary_split: true                # false: data.split_seed stays 0 (one test set; seeds only vary the training)
      timeout: 21600
      jobs: 1                         # fine-tuning runs at once here (each gets cores / jobs threads); --jobs N
    cells:                            # listed cells ...
      - {name: mae, recipe: hi_end_mae, overrides: {task.mask_ratio: 0.75}}
      - {name: vf, recipe: volume_fusion, steps: 300}          # steps: this cell's own (default pretrain.steps)
    grid:                             # ... and/or grids (a mapping or a list of them): one cell per combination
      recipe: hi_end_mae
      overrides: {}                   # fixed for every cell of the grid (steps: as a cell's)
      axes:
        task.mask_ratio: [0.6, 0.75, 0.9]                     # one key, its values
        decoding: {hier: {task.cross_depth: 3}, final: {task.self_depth: 5, task.cross_depth: 0}}  # named settings
    slurm:                            # only for --slurm (all optional)
      partition: null
      account: null
      extra: []                       # more "#SBATCH" options, e.g. ["--qos=high"]
      pretrain: {time: "24:00:00", gpus: 1, cpus: 8, mem: null}
      finetune: {time: "04:00:00", gpus: 1, cpus: 8, mem: null}

Grid cells are named from their settings (``mask_ratio-0.6_decoding-hier``). Runs the runner owns
(``train.steps``, ``train.seed``, ``data.split_seed``, ``data.n_train``) may not be overridden.
"""

from .cli import main
from .results import case_means, collect, paired_diffs, paired_interval
from .runner import Runner, command, plan, run_all, run_entry, status
from .slurm import write_slurm
from .spec import Ablation, AblationError, Cell, _grid_cells, load

__all__ = ["Ablation", "AblationError", "Cell", "Runner", "case_means", "collect", "command", "load", "main",
           "paired_diffs", "paired_interval", "plan", "run_all", "run_entry", "status", "write_slurm", "_grid_cells"]
