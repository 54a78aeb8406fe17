"""``--slurm``: one sbatch array per stage (pretraining cells, then fine-tuning runs chained ``afterany``) and a
collect job, in ``recipes/launch/slurm.sbatch``'s conventions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .spec import Ablation
from .runner import write_text


# ============================================================================================ SLURM
def _sbatch_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}-{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:00" if s >= 86400 else \
        f"{s // 3600:02d}:{s % 3600 // 60:02d}:00"


def write_slurm(abl: Ablation, p: dict, out: Path, file: str) -> list[Path]:
    """OUT/slurm/{pretrain,finetune,collect}.sbatch + submit.sh; the array tasks run entries of OUT/plan.json."""
    import shlex

    d = Path(out) / "slurm"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    made = []
    py, abl_file, cwd = shlex.quote(sys.executable), shlex.quote(str(Path(file).resolve())), shlex.quote(os.getcwd())
    outq = shlex.quote(str(Path(out).resolve()))
    for stage, runs in (("pretrain", p["pretrain"]), ("finetune", p["finetune"])):
        conf = abl.slurm.get(stage) or {}
        nproc = abl.pre["nproc"] if stage == "pretrain" else abl.ft["nproc"]
        gpus = conf.get("gpus", nproc)
        head = ["#!/bin/bash",
                f"# medssl ablation {abl.name}, stage {1 if stage == 'pretrain' else 2}: one {stage} run per array task "
                f"({len(runs)} runs, listed in {Path(out).resolve() / 'plan.json'}).",
                "# Each task runs `python -m medssl.pretrain ablate FILE --run-index $SLURM_ARRAY_TASK_ID --stage "
                f"{stage}`: the runner's own code path (folder, log, done/failed marker).",
                "# Time limit: SLURM sends SIGUSR1 5 minutes before it (B:); the runner passes SIGTERM to the run (a "
                "pretraining run saves a checkpoint), then the task is requeued and resumes.",
                f"#SBATCH --job-name=medssl-ablate-{abl.name}-{stage}",
                f"#SBATCH --array=0-{len(runs) - 1}",
                "#SBATCH --nodes=1",
                "#SBATCH --ntasks-per-node=1"]
        if gpus:
            head.append(f"#SBATCH --gpus-per-node={int(gpus)}")
        head.append(f"#SBATCH --cpus-per-task={int(conf.get('cpus') or 8)}")
        if conf.get("mem"):
            head.append(f"#SBATCH --mem={conf['mem']}")
        limit = conf.get("time") or _sbatch_time((abl.pre if stage == "pretrain" else abl.ft)["timeout"] + 600)
        head += [f"#SBATCH --time={limit}", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={Path(out).resolve() / 'slurm' / 'logs'}/%x-%A_%a.out",
                 f"#SBATCH --chdir={os.getcwd()}"]
        if abl.slurm.get("partition"):
            head.append(f"#SBATCH --partition={abl.slurm['partition']}")
        if abl.slurm.get("account"):
            head.append(f"#SBATCH --account={abl.slurm['account']}")
        head += [f"#SBATCH {x}" for x in abl.slurm.get("extra") or []]
        body = f"""
set -uo pipefail
cd {cwd}
threads=$(( ${{SLURM_CPUS_PER_TASK:-8}} / {nproc} ))
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}}  # per process

requeue=0
run_pid=""
notice() {{  # SIGUSR1 (time limit) or SIGTERM (pre-emption): the run checkpoints and stops, the task is requeued
  requeue=1
  echo "$(date -Is) $1: stopping run $SLURM_ARRAY_TASK_ID of {stage} (it saves what it can)"
  if [ -n "$run_pid" ]; then kill -TERM "$run_pid" 2>/dev/null; fi
}}
trap 'notice SIGUSR1' USR1
trap 'notice SIGTERM' TERM

{py} -m medssl.pretrain ablate {abl_file} --out {outq} --run-index "$SLURM_ARRAY_TASK_ID" --stage {stage} &
run_pid=$!
status=0
while kill -0 "$run_pid" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait again until the runner ends
  wait "$run_pid"
  status=$?
done
if [ "$requeue" = 1 ]; then
  echo "$(date -Is) requeueing $SLURM_JOB_ID (the run continues from its checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
"""
        path = d / f"{stage}.sbatch"
        write_text(path, "\n".join(head) + "\n" + body)
        made.append(path)
    collect_sh = "\n".join([
        "#!/bin/bash", f"# medssl ablation {abl.name}, stage 3: results.csv / results.md / plots from every run folder",
        f"#SBATCH --job-name=medssl-ablate-{abl.name}-collect", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2", "#SBATCH --time=00:30:00", "#SBATCH --open-mode=append",
        f"#SBATCH --output={Path(out).resolve() / 'slurm' / 'logs'}/%x-%j.out", f"#SBATCH --chdir={os.getcwd()}",
        *([f"#SBATCH --partition={abl.slurm['partition']}"] if abl.slurm.get("partition") else []),
        *([f"#SBATCH --account={abl.slurm['account']}"] if abl.slurm.get("account") else []),
        "", "set -uo pipefail", f"cd {cwd}", f"{py} -m medssl.pretrain ablate {abl_file} --out {outq} --collect", ""])
    write_text(d / "collect.sbatch", collect_sh)
    made.append(d / "collect.sbatch")
    submit = f"""#!/bin/bash
# Submit the ablation {abl.name}: stage 1 (pretraining, {len(p['pretrain'])} array tasks), stage 2 (fine-tuning,
# {len(p['finetune'])} array tasks) after ALL of stage 1 has ended (afterany: a failed cell must not block the
# others; its fine-tuning tasks find no export and record "skipped"), stage 3 (results) after stage 2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
jid=$(sbatch --parsable "$here/pretrain.sbatch")
jid=${{jid%%;*}}
echo "stage 1 (pretraining): job $jid"
jid2=$(sbatch --parsable --dependency=afterany:$jid "$here/finetune.sbatch")
jid2=${{jid2%%;*}}
echo "stage 2 (fine-tuning): job $jid2 (after $jid)"
jid3=$(sbatch --parsable --dependency=afterany:$jid2 "$here/collect.sbatch")
jid3=${{jid3%%;*}}
echo "stage 3 (results): job $jid3 (after $jid2); results in {Path(out).resolve()}/results.md"
"""
    write_text(d / "submit.sh", submit)
    os.chmod(d / "submit.sh", 0o755)
    made.append(d / "submit.sh")
    return made
