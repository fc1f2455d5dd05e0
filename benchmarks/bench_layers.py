"""Per-layer benchmark: one adapted linear layer, peft_fast vs peft vs the frozen base layer.

A thin wrapper: the benchmark lives in `peft_fast.cli._bench_layers` (also run by
`peft-fast bench --layers`); this script keeps its command line (Llama-3-8B layer shapes by
default, rows appended to <out>/layers.csv) for benchmarks/gpu_suite.sh and bench_qlora.py.
Results are written as cases finish (layers.csv and layers.json after every case; layers.png at
the end, or at a SIGTERM such as `timeout`'s, which also exits 143); --time-budget counts from the
process's start.

    python benchmarks/bench_layers.py --out benchmarks/results/gpu/h100
    python benchmarks/bench_layers.py --quick --out /tmp/bl
    python benchmarks/bench_layers.py --help        # every option, with the method's details
"""
from __future__ import annotations

import time

_T_IMPORT = time.monotonic()  # before the heavy imports: --time-budget counts them

import os  # noqa: E402
import sys  # noqa: E402

try:
    import peft_fast as _installed  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peft_fast.cli._bench_layers import (  # noqa: E402,F401  (re-exported for bench_qlora.py and tests)
    FULL_DEFAULTS,
    METHODS,
    MODES,
    PROVIDERS,
    QUICK_DEFAULTS,
    OneLinear,
    adapter_config,
    budget_stop,
    build_providers,
    count_errors,
    main as _main,
    make_cases,
    measure_provider,
    method_label,
    parse_args,
    parse_shape,
    peak_mem_mib,
    print_table,
    randomise_adapters,
    ratio_plot,
    relative_diff,
    retained_backward_works,
    run,
    run_case,
    set_grads_none,
    sync,
    time_fn,
    trainables,
)


def main(argv=None) -> list:
    """--time-budget counts from the process's start when run as a script, else from this module's
    import (a test or another script calling main())."""
    if __name__ == "__main__":
        return _main(argv, prog=os.path.basename(__file__))  # t0: the process's start
    return _main(argv, prog=os.path.basename(__file__), t0=_T_IMPORT)


if __name__ == "__main__":
    sys.exit(1 if count_errors(main()) else 0)
