"""peft_fast.cli._bench_common.RowWriter: benchmark results written as rows finish (CSV appended
to what was there, JSON with this run's meta and rows, atomically), the PNG at the end, and at a
SIGTERM (what `timeout` sends at a step's cap) everything so far, then exit 143; process_start()."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from peft_fast.cli._bench_common import RowWriter, process_start, write_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_written_as_they_come_after_the_old_ones(tmp_path):
    write_rows(str(tmp_path), "x", [{"a": 1, "b": 2}], {"old": True}, append=True)  # an earlier run
    drawn = []
    w = RowWriter(str(tmp_path), "x", {"device": "cpu"}, append=True,
                  plot=lambda path, rows, meta: drawn.append(len(rows)) or False,
                  finalize=lambda meta: meta.update(extra=7), t0=time.monotonic())
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["meta"]["status"] == "running" and meta["rows"] == []  # written before the first row
    w.add([{"a": 3, "b": 4}])
    assert [r["a"] for r in _csv(tmp_path / "x.csv")] == ["1", "3"]
    js = json.loads((tmp_path / "x.json").read_text())
    assert js["rows"] == [{"a": 3, "b": 4}] and js["meta"]["rows_written"] == 1 and "extra" not in js["meta"]
    w.add([{"a": 5, "c": "new"}])  # a new column: the old rows are rewritten under the wider header
    rows = _csv(tmp_path / "x.csv")
    assert [(r["a"], r["b"], r["c"]) for r in rows] == [("1", "2", ""), ("3", "4", ""), ("5", "", "new")]
    assert not drawn  # the PNG only at the end
    paths = w.finish()
    assert drawn == [2]
    js = json.loads((tmp_path / "x.json").read_text())
    assert js["meta"]["status"] == "complete" and js["meta"]["extra"] == 7 and len(js["rows"]) == 2
    assert paths == [str(tmp_path / "x.csv"), str(tmp_path / "x.json")]
    assert sorted(os.listdir(tmp_path)) == ["x.csv", "x.json"]  # no temporary files left


def test_append_false_and_no_out_dir(tmp_path):
    write_rows(str(tmp_path), "y", [{"a": 1}], {}, append=True)
    w = RowWriter(str(tmp_path), "y", {}, append=False)
    w.add([{"a": 2}])
    assert [r["a"] for r in _csv(tmp_path / "y.csv")] == ["2"]
    w.meta["status"] = "truncated"
    w.finish()
    assert json.loads((tmp_path / "y.json").read_text())["meta"]["status"] == "truncated"
    w = RowWriter(None, "z", {})  # nothing written anywhere
    w.add([{"a": 1}])
    assert w.finish() == [] and w.rows == [{"a": 1}]


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from peft_fast.cli._bench_common import RowWriter

    def plot(path, rows, meta):
        with open(path + ".log", "a") as f:
            f.write("start ")
        if {kill_in_plot!r}:  # a SIGTERM while the files are being written waits for the write
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        with open(path, "w") as f:
            f.write("png %d" % len(rows))
        with open(path + ".log", "a") as f:
            f.write("end ")
        return True

    w = RowWriter({out!r}, "s", {{}}, plot=plot, finalize=lambda m: m.update(final=1))
    w.install_sigterm(lambda: "case 3")
    w.add([{{"i": 1}}])
    w.add([{{"i": 2}}])
    print("two rows", flush=True)
    if {kill_in_plot!r}:
        w.finish()
    else:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    print("not reached")
""")


def _run(tmp_path, kill_in_plot):
    code = _SCRIPT.format(root=ROOT, out=str(tmp_path), kill_in_plot=kill_in_plot)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_sigterm_writes_what_is_there_and_exits_143(tmp_path):
    r = _run(tmp_path, kill_in_plot=False)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "two rows" in r.stdout and "not reached" not in r.stdout
    assert [row["i"] for row in _csv(tmp_path / "s.csv")] == ["1", "2"]
    meta = json.loads((tmp_path / "s.json").read_text())["meta"]
    assert meta["status"] == "terminated" and meta["final"] == 1
    assert "SIGTERM" in meta["terminated"] and "during case 3" in meta["terminated"]
    assert "2 finished row(s)" in meta["terminated"]
    assert (tmp_path / "s.png").read_text() == "png 2"
    assert (tmp_path / "s.png.log").read_text().split() == ["start", "end"]
    assert "SIGTERM after" in r.stderr


def test_sigterm_during_a_write_waits_for_it(tmp_path):
    r = _run(tmp_path, kill_in_plot=True)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert (tmp_path / "s.png").read_text() == "png 2"
    # finish()'s plot ran to its end before the handler drew again (not nested inside it)
    assert (tmp_path / "s.png.log").read_text().split() == ["start", "end", "start", "end"]
    assert json.loads((tmp_path / "s.json").read_text())["meta"]["status"] == "terminated"


def test_process_start_counts_what_ran_before_the_import():
    assert process_start() <= time.monotonic()
    # the clock is read before the import: a start taken at import time would come after `first`, the
    # first clock reading of the child's own code (1.5 s before the import)
    code = (f"import time; first = time.monotonic(); time.sleep(1.5); import sys; sys.path.insert(0, {ROOT!r})\n"
            "from peft_fast.cli._bench_common import process_start\n"
            "print(first, process_start())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    first, start = map(float, out.stdout.strip().splitlines()[-1].split())
    assert start <= first, (start, first)
    # and it is this process's start, not an older clock origin: only interpreter start-up before `first`
    assert first - start < 10, (start, first)
