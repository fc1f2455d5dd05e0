"""`peft-fast run`: run a Python script, module or console command with ``import peft`` giving peft_fast.

    peft-fast run train.py --epochs 1                   # a script, as `python train.py --epochs 1`
    peft-fast run -m trl sft --model_name_or_path ...   # a module, as `python -m trl sft ...`
    peft-fast run trl sft --use_peft ...                # an installed console command (its entry point)
    peft-fast run accelerate launch train.py            # launchers: every process they start gets it too

Installs the peft alias (`peft_fast.install_as_peft()`) in this process and runs the target here (runpy,
or the console command's entry point from the installed metadata) with ``sys.argv`` as the target expects.
Child Python processes get the alias as well: PEFT_FAST_AS_PEFT=1 is set and a start-up hook
(peft_fast/_subprocess_hook/sitecustomize.py) is put first on PYTHONPATH; it installs the alias the first
time the child looks for ``peft``. Everything after the target belongs to the target.
Exit status: the target's. Errors: an unknown command, a missing script or module is named, exit 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import runpy
import sys
from typing import Sequence

from ._train_util import CLIError

PROG = "peft-fast run"
USAGE = f"usage: {PROG} (SCRIPT.py | -m MODULE | COMMAND) [ARGS...]"
HOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_subprocess_hook")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Only for `peft-fast --help`: `main.main` hands ``run``'s arguments to `main` unparsed."""
    p = subparsers.add_parser("run", help="run a script/module/command with `import peft` giving peft_fast",
                              description=__doc__.split("\n\n")[0], usage=USAGE.replace("usage: ", ""))
    p.add_argument("target", nargs=argparse.REMAINDER, help="SCRIPT.py, -m MODULE or COMMAND, then its arguments")
    p.set_defaults(func=lambda args: main(args.target))
    return p


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what a console script / sys.exit("message") does
    return 1


def _children_get_the_alias() -> None:
    os.environ["PEFT_FAST_AS_PEFT"] = "1"
    path = os.environ.get("PYTHONPATH", "")
    if HOOK_DIR not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = HOOK_DIR + (os.pathsep + path if path else "")


def _resolve(argv: list[str]):
    """(kind, target, argv for the target) from run's arguments: target is the module name, the script
    path, or the console command's entry point."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CLIError("give a script, -m MODULE, or a console command to run")
    if argv[0] == "-m":
        if len(argv) < 2:
            raise CLIError("-m needs a module name")
        return "module", argv[1], [argv[1], *argv[2:]]
    if argv[0].endswith(".py") or os.path.sep in argv[0] or os.path.isfile(argv[0]):
        if not os.path.isfile(argv[0]):
            raise CLIError(f"no such script: {argv[0]!r}")
        return "script", argv[0], list(argv)
    entry_point = next(iter(importlib.metadata.entry_points(group="console_scripts", name=argv[0])), None)
    if entry_point is None:
        raise CLIError(f"{argv[0]!r} is neither a script nor an installed console command")
    return "command", entry_point, list(argv)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__)
        return 0
    try:
        kind, name, target_argv = _resolve(argv)
    except CLIError as e:
        print(f"{USAGE}\n{PROG}: error: {e}", file=sys.stderr)
        return 2
    import peft_fast

    _children_get_the_alias()
    peft_fast.install_as_peft()  # before anything of the target is imported (finding a module runs its parents)
    if kind == "module":
        sys.path.insert(0, os.getcwd())  # as `python -m`
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            print(f"{USAGE}\n{PROG}: error: no module named {name!r}", file=sys.stderr)
            return 2
    sys.argv = target_argv
    try:
        if kind == "module":
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        elif kind == "script":
            sys.path.insert(0, os.path.dirname(os.path.abspath(name)))
            runpy.run_path(name, run_name="__main__")
        else:
            return _exit_code(name.load()())  # `name` is the command's entry point
    except SystemExit as e:
        return _exit_code(e.code)
    return 0
