"""The conformance replay (benchmarks/conformance_replay.py): every CuPy call the GPU tests made on the stand-in,
replayed on this ``cupy``.  On the stand-in (CI) it must find no difference, which also says that
tests/cupy_standin/recorded_calls.json is up to date with the stand-in; on a real GPU a difference is a
leniency (or a false strictness) of the stand-in, named call by call.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from cupy_standin.pytest_plugin import ON_STANDIN

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import conformance_replay as replay  # noqa: E402

pytestmark = [pytest.mark.gpu]


def test_every_recorded_call_does_here_what_it_did_on_the_stand_in(cupy_module):
    calls = replay.ordered(replay.load())
    summary = replay.replay(calls, cupy_module, budget_s=60 if ON_STANDIN else 300)
    assert summary["stopped"] is None, summary["stopped"]
    assert summary["differences"] == 0, "\n".join(f"{d['call']}: stand-in {replay.said(d['stand_in'])}; here "
                                                  f"{replay.said(d['here'])}" for d in summary["diffs"])
    assert summary["replayed"] == len(calls) and summary["unreplayable"] == 0, summary
    if ON_STANDIN:
        assert summary["seconds"] < 20, summary  # CI runs it on every push


def test_the_recorded_file_is_small_sorted_and_holds_the_stand_ins_refusals():
    text = replay.CALLS.read_text()
    assert len(text) < 200_000
    calls = replay.load()
    assert [replay._key(dict(c, outcome=c["expect"])) for c in calls] == \
        sorted(replay._key(dict(c, outcome=c["expect"])) for c in calls)  # one order: diffs stay readable
    assert all(c.keys() == {"name", "args", "kwargs", "expect"} for c in calls)
    assert len(text.splitlines()) == len(calls) + 3  # one call per line
    names = {c["name"] for c in calls}
    assert any(n.startswith("ElementwiseKernel:tinynet_") for n in names) and "ndarray.sum" in names
    refused = {replay.describe(c) for c in calls if "raises" in c["expect"]}
    for claim in ("ndarray.__array__(float32/(3,))", "add(float32/(3,), np.float32/(3,))",
                  "ndarray.sum(float32/(2, 3), initial=0.0)", "numpy.insert(float32/(4,), 0, 1.0)"):
        assert claim in refused, sorted(refused)


def test_a_call_that_differs_is_printed_and_counted(cupy_module, capsys):
    calls = [c for c in replay.load() if c["name"] in ("ndarray.__array__", "ndarray.sum")][:3]
    lenient = dict(calls[0], expect={"returns": {"host": "float32", "shape": [3]}})  # as a lenient stand-in says
    summary = replay.replay([lenient] + calls[1:], cupy_module)
    assert summary["differences"] == 1 and summary["replayed"] == 3
    printed = capsys.readouterr().out
    assert printed.startswith(f"DIFF {replay.describe(lenient)}: stand-in returns ") and "here raises " in printed


def test_the_script_replays_in_processes_and_says_so_in_one_line(tmp_path):
    import cupy_standin

    calls = replay.load()
    small = [c for c in calls if "raises" in c["expect"]][:4] + [c for c in calls if "raises" not in c["expect"]][:4]
    small[-1] = dict(small[-1], expect={"raises": "TypeError"})  # one difference
    path = tmp_path / "calls.json"
    path.write_text(json.dumps({"calls": small}))
    env = cupy_standin.standin_env()  # the stand-in through the shim, as any `import cupy` would get it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conformance_replay.py"), "--calls", str(path),
                           "--jobs", "2", "--json", str(tmp_path / "summary.json")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("DIFF ") for line in lines) == 1 and lines[-1].startswith("RESULT ")
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["calls"] == result["replayed"] == 8 and result["differences"] == 1 and result["jobs"] == 2
    assert len(json.loads((tmp_path / "summary.json").read_text())["diffs"]) == 1


def test_the_stand_in_records_name_dtypes_shapes_keywords_and_outcome(cupy_module):
    import cupy_standin as cp

    previous = cp._calls
    cp._calls = None
    calls = cp.record_calls()
    try:
        a = cp.ones((2, 3), dtype=cp.float32)
        a.sum(axis=1, keepdims=True)
        with pytest.raises(TypeError):
            a.sum(initial=0.0)
        cp.asnumpy(a)  # one call: asnumpy (its ndarray.get inside is not one of tinynet's)
    finally:
        cp._calls = previous
    kept = {json.dumps(example, sort_keys=True) for _, example in calls.values()}
    assert len(calls) == 4
    assert json.dumps({"name": "ndarray.sum", "args": [{"array": "float32", "shape": [2, 3]}],
                       "kwargs": {"axis": {"int": True, "value": 1}, "keepdims": {"bool": True, "value": True}},
                       "outcome": {"returns": {"array": "float32", "shape": [2, 1]}}}, sort_keys=True) in kept
    assert any('"raises": "TypeError"' in k and '"initial"' in k for k in kept)
    assert any('"name": "asnumpy"' in k and '"host": "float32"' in k for k in kept)
    assert not any('"ndarray.get"' in k for k in kept)
