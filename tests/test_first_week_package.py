"""One import name, ``medssl``, for the four parts; every command works from any folder.

A user's working directory often holds data folders named like our parts (the README's own commands
make ``shards/``); they must never shadow the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_folders(tmp_path_factory):
    """A working directory holding ``shards/``, ``pretrain/``, ``recipes/`` and ``finetune/`` data folders."""
    cwd = tmp_path_factory.mktemp("workdir")
    for name in ("shards", "pretrain", "recipes", "finetune"):
        (cwd / name).mkdir()
        (cwd / name / "notes.txt").write_text("user data\n")
    (cwd / "shards" / "ct").mkdir()  # like `shards build … --out shards/ct`
    return cwd


def _run(args, cwd):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH="")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_point6_commands_run_from_a_folder_with_data_folders(data_folders):
    r = _run(["-m", "medssl.pretrain", "list"], data_folders)
    assert r.returncode == 0, r.stderr
    assert "hi_end_mae" in r.stdout and "volume_fusion" in r.stdout
    for part in ("shards", "finetune"):
        r = _run(["-m", f"medssl.{part}", "--help"], data_folders)
        assert r.returncode == 0, (part, r.stderr)
        assert "usage" in r.stdout.lower()
    r = _run(["-c", "import medssl, medssl.shards, medssl.pretrain.train, medssl.recipes.hi_end_mae, "
                    "medssl.finetune.train; from medssl.shards import StreamConfig; "
                    "print(medssl.shards.__file__)"], data_folders)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == ROOT / "shards"


def test_point6_console_script_and_module_dispatch(data_folders):
    r = _run(["-m", "medssl", "shards", "--help"], data_folders)
    assert r.returncode == 0, r.stderr
    assert "build" in r.stdout
    r = _run(["-m", "medssl", "nosuchcommand"], data_folders)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_point6_wheel_installs_one_top_level_name(tmp_path):
    """The wheel holds medssl/ and nothing else at the top (no generic `shards`, `pretrain`, … names)."""
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "medssl", "shards", "pretrain", "finetune", "recipes"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(src), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("medssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"medssl"}
    for must in ("medssl/__init__.py", "medssl/shards/loader.py", "medssl/pretrain/train.py",
                 "medssl/pretrain/backbones/vit3d.py", "medssl/finetune/train.py", "medssl/recipes/hi_end_mae.py",
                 "medssl/recipes/hi_end_mae.yaml", "medssl/recipes/launch/slurm.sbatch"):
        assert must in names, must
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["medssl"]


def test_point6_launch_examples_use_the_module_name():
    for path in (ROOT / "recipes/launch/slurm.sbatch", ROOT / "recipes/launch/hostfile.example", ROOT / "README.md"):
        text = path.read_text()
        assert "-m pretrain " not in text and "--module pretrain " not in text, path
        assert "medssl.pretrain" in text, path
