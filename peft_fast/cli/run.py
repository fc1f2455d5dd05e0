"""`peft-fast run`: run a Python script, module or console command with ``import peft`` giving peft_fast.

    peft-fast run train.py --epochs 1            # a script
    peft-fast run -m trl sft --model_name_or_path ...   # a module (python -m)
    peft-fast run trl sft --use_peft ...         # an installed console command (its entry point)
    accelerate launch --no_python peft-fast run train.py   # every process of a launch

Calls `peft_fast.install_as_peft()` and then runs the target in this same process (runpy, or the console
command's entry point from the installed metadata), with ``sys.argv`` as the target expects. For
commands that import PEFT by name (TRL's CLI, a training script written for peft) without editing them.
Exit status: the target's. Errors: an unknown command or a missing script is named, exit 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import runpy
import sys

from ._train_util import CLIError

PROG = "peft-fast run"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="run a script/module/command with `import peft` giving peft_fast",
                              description="Install the peft alias (peft_fast.install_as_peft()) and run TARGET "
                                          "in this process: a .py script, -m MODULE, or an installed console "
                                          "command (e.g. `trl`).")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module as `python -m MODULE` would")
    p.add_argument("target", nargs=argparse.REMAINDER, help="script.py or console command, then its arguments")
    p.set_defaults(func=run)
    return p


def _console_entry_point(name: str):
    matches = importlib.metadata.entry_points(group="console_scripts", name=name)
    return next(iter(matches), None)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run(args) -> int:
    import peft_fast

    target = list(args.target)
    try:
        if args.module is None and not target:
            raise CLIError("give a script, -m MODULE, or a console command to run")
        if args.module is None and target[0] == "--":
            target = target[1:]
        peft_fast.install_as_peft()
        try:
            if args.module is not None:
                sys.argv = [args.module, *target]
                runpy.run_module(args.module, run_name="__main__", alter_sys=True)
            elif target[0].endswith(".py") or os.path.sep in target[0]:
                if not os.path.isfile(target[0]):
                    raise CLIError(f"no such script: {target[0]!r}")
                sys.argv = target
                sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
                runpy.run_path(target[0], run_name="__main__")
            else:
                ep = _console_entry_point(target[0])
                if ep is None:
                    raise CLIError(f"{target[0]!r} is neither a .py script nor an installed console command")
                sys.argv = target
                result = ep.load()()
                return int(result) if isinstance(result, int) else 0
        except SystemExit as e:
            return _exit_code(e)
        return 0
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
