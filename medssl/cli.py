"""The ``medssl`` console script: one entry point that dispatches to the package command lines.

``medssl shards build …`` is ``python -m medssl.shards build …``. Under a launcher (torchrun, deepspeed)
use the module form, which works everywhere: ``torchrun … -m medssl.pretrain …``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"shards": "medssl.shards.__main__", "pretrain": "medssl.pretrain.__main__",
            "finetune": "medssl.finetune.__main__"}


def medssl_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from medssl import __version__

        print(f"medssl {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(sorted(COMMANDS))
        msg = (f"usage: medssl COMMAND [ARGS...] | medssl --version   (commands: {known}; `medssl COMMAND --help` "
               "for each)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"medssl: unknown command {argv[0]!r}\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(medssl_main())
