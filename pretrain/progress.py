"""Progress for people and for log files: a tqdm bar on a terminal, plain lines everywhere else.

Under SLURM, ``nohup`` or CI stdout/stderr is a file, and a carriage-return bar turns into one line of
tens of thousands of characters. There, every ``every`` steps (and at the last) one line is printed:

    hi_end_mae step 200/1000 loss 0.8123 lr 2.00e-04 samples/s 16.9 elapsed 0:01:10 eta 0:04:40
"""

from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update(step, **scalars)`` after every step. ``bar=None`` picks the bar only on a terminal;
    ``enabled=False`` (other ranks, ``--no-progress`` on a terminal) prints nothing."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: int = 10, enabled: bool = True,
                 bar: bool | None = None, stream=None):
        self.total, self.start, self.desc, self.every = total, initial, desc, max(1, int(every))
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.t0 = time.time()
        self.bar = None
        if enabled and (is_terminal(self.stream) if bar is None else bar):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in scalars.items()}
            self.bar.set_postfix(shown, refresh=False)
            return
        if step % self.every and step != self.total:
            return
        elapsed = time.time() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"{self.desc} step {step}/{self.total}".strip()]
        for k, v in scalars.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"elapsed {_hms(elapsed)}")
        if eta == eta:
            parts.append(f"eta {_hms(eta)}")
        print(" ".join(parts), file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
