"""Crash test (issue 12): `compress` and `add` killed with SIGKILL at chosen points never leave a collection that loads
but differs from the old or the new complete state, and a rerun finishes the job and leaves no temporary folders.

One worker process imports peft-jd once, then forks a child per run. A child counts the file-system operations of the
run (`os.replace`, `os.rename`, `os.mkdir`, `os.open`, `os.link`, `os.unlink`, `os.rmdir`, `os.chmod`, `os.fsync`,
the atomic exchange) and kills itself with SIGKILL at the k-th one; an uninterrupted child gives the number of
operations and the new state. Half of the seeds disable `RENAME_EXCHANGE`, so the two-rename swap and its repair are
crashed too. Both operations start from an existing collection (compress replaces it with other adapters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
SEEDS = 20

_WORKER = r"""
import json, os, random, shutil, signal, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
from collection_fixtures import snapshot, write_lora
from peft_jd.compression import compress, extend_collection
from peft_jd.core import io as core_io

op, root, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3])
root = os.path.abspath(root)
loras = {name: str(write_lora(Path(root, "loras", name), seed=i, r=2 + i % 2))
         for i, name in enumerate("abcdefg")}
pristine, out = os.path.join(root, "pristine"), os.path.join(root, "work", "col")
OPERATIONS = ("replace", "rename", "mkdir", "open", "link", "unlink", "rmdir", "chmod", "fsync")


def run(kind):
    if kind == "base":
        compress([loras[n] for n in "abc"], pristine, rank=2, clusters=2, progress=False)
    elif op == "compress":
        compress([loras[n] for n in "bdef"], out, rank=2, clusters=2, progress=False)
    else:
        extend_collection(out, [loras["d"], loras["g"]], warn_error=10.0, progress=False)


def in_child(kind, kill_at=0, exchange=True):
    # Returns (exit status, {"count": operations, "trash"/"exchange": index of the swap's first step}) of `run(kind)`
    # in a forked child.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        count, marks = [0], {}
        if not exchange:
            core_io._LIBC = None
        def hook(function, mark=None):
            def counted(*args, **kwargs):
                count[0] += 1
                if mark == "exchange" or (mark == "trash" and os.path.basename(str(args[1])).startswith(".trash-")):
                    marks[mark] = count[0]
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return function(*args, **kwargs)
            return counted
        for name in OPERATIONS:
            setattr(os, name, hook(getattr(os, name), "trash" if name == "replace" else None))
        core_io._exchange = hook(core_io._exchange, "exchange")
        status = 0
        try:
            run(kind)
        except BaseException as exc:
            print(f"child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
        os.write(write, json.dumps(dict(marks, count=count[0])).encode())
        os._exit(status)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    counted = os.read(read, 4096)
    os.close(read)
    return status, json.loads(counted or "{}")


def reset():
    work = os.path.dirname(out)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shutil.copytree(pristine, out)


def leftovers():
    return sorted(n for n in os.listdir(os.path.dirname(out)) if n.startswith((".tmp-", ".trash-"))
                  or n.endswith(".peft-jd-work"))


assert in_child("base")[0] == 0
reset()
old = snapshot(Path(out))
results = {"runs": []}
new, totals = None, {}
for exchange in (True, False):
    reset()
    status, totals[exchange] = in_child("op", exchange=exchange)
    assert status == 0, "uninterrupted run failed"
    state = snapshot(Path(out))
    assert new is None or state == new, "the two swap modes give different collections"
    new = state
assert new != old
# Random points, plus the steps of the final swap itself: before/after the exchange, and before, between and after
# the two renames of the fallback (the window where the collection folder is missing until the next writer).
plan = [(seed, seed % 2 == 0, random.Random(seed).randint(1, totals[seed % 2 == 0]["count"])) for seed in range(seeds)]
plan += [(-1, True, totals[True]["exchange"] + d) for d in (0, 1)]
plan += [(-1, False, totals[False]["trash"] + d) for d in (0, 1, 2)]
for seed, exchange, kill_at in plan:
    reset()
    status, _ = in_child("op", kill_at, exchange)
    state = snapshot(Path(out))
    outcome = "none" if state is None else "old" if state == old else "new" if state == new else "mixed"
    run_info = {"seed": seed, "kill_at": kill_at, "of": totals[exchange]["count"], "exchange": exchange,
                "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "outcome": outcome}
    if outcome != "new" or op == "compress":  # a finished `add` is rightly refused a second time
        rerun, _ = in_child("op")
        run_info["rerun_ok"] = rerun == 0
        run_info["after_rerun"] = "new" if snapshot(Path(out)) == new else "other"
        run_info["leftovers"] = leftovers()
    results["runs"].append(run_info)
print(json.dumps(results))
"""


@pytest.mark.parametrize("op", ["compress", "add"])
def test_killed_writer_leaves_old_or_new_collection(op, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    done = subprocess.run([sys.executable, "-c", _WORKER, op, str(tmp_path), str(SEEDS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])["runs"]
    assert len(runs) == SEEDS + 5 and all(run["killed"] for run in runs), runs
    for run in runs:
        assert run["outcome"] in ("old", "new", "none"), run
        if "rerun_ok" in run:
            assert run["rerun_ok"] and run["after_rerun"] == "new" and run["leftovers"] == [], run
    # Kill points before the swap (old state), after it (new state), and between the fallback's two renames (no
    # collection until the next writer restores it).
    assert {run["outcome"] for run in runs} == {"old", "new", "none"}, runs
    assert [run["outcome"] for run in runs[-3:]] == ["old", "none", "new"], runs[-3:]
