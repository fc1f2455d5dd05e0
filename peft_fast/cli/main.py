"""`peft-fast` entry point: one sub-command per module of this package.

Each sub-command module exposes `add_parser(subparsers)` (registers its argparse parser and
sets `func`) and a `run(args) -> int`; this file only dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = ("bench", "train", "env", "merge", "run")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="peft-fast",
        description="peft_fast: side-by-side throughput benchmark vs PEFT, (Q)LoRA/DoRA/IA3 training, "
                    "environment report, adapter merging, running scripts with `import peft` giving peft_fast.",
    )
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"peft_fast.cli.{name}").add_parser(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # everything after the target is the target's: not for argparse
        from .run import main as run_main

        return run_main(argv[1:])
    import peft_fast

    # bench compares with, and env reports, the real peft: never the alias (PEFT_FAST_AS_PEFT=1, or a
    # process started under `peft-fast run`)
    peft_fast.uninstall_as_peft()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "command", None):
        ap.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
