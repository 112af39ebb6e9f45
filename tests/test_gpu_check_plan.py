"""benchmarks/gpu_check.sh fits the device machine, on paper and in a dry run on the CPU.

The GPU is lent for 15 minutes in all, 10 per command, and returns at most 8
small files per call, so the plan is checked here where it costs nothing: the
stage timeouts against those limits, every stage run with ``--dry-run`` (the
same driver, logs and JSON, with CPU stand-ins for the GPU commands), a step
that overruns its timeout, and a stage killed half-way.  Last, every test that
skips without a GPU must carry the ``gpu`` marker, since ``gpu_check.sh``
selects the GPU tests with ``-m gpu``: one without it never runs anywhere.
"""
import ast
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks import gpu_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMITS = gpu_check.LIMITS


# ---------------------------------------------------------------------------
# The plan, on paper
# ---------------------------------------------------------------------------
def test_limits_are_the_device_tools():
    assert LIMITS == {"per_call_s": 600, "session_s": 900, "files_back": 8, "file_mib": 16, "folders_deep": 2}


@pytest.mark.parametrize("stage", list(gpu_check.STAGES))
def test_every_stage_ends_well_inside_one_command(stage):
    cap = gpu_check.stage_cap(stage)
    assert cap <= LIMITS["per_call_s"] // 2, f"{stage}: its steps may run {cap} s, over half of a command's 600 s"
    for step in gpu_check.STAGES[stage]:
        assert 0 < step.expected_s < step.timeout_s, step


def test_the_whole_plan_fits_the_session_with_time_to_spare():
    plan = gpu_check.session_plan()
    assert plan["total_s"] == (gpu_check.START_UP_S + sum(map(gpu_check.stage_cap, gpu_check.STAGES))
                               + gpu_check.GAP_S * len(gpu_check.STAGES))
    assert plan["total_s"] <= LIMITS["session_s"] - 60, plan
    assert gpu_check.START_UP_S >= 60 and gpu_check.GAP_S >= 30  # a start takes "a minute or more"; warm 30 s


def test_the_written_plan_matches_the_code():
    doc = gpu_check.__doc__
    plan = gpu_check.session_plan()
    for stage in gpu_check.STAGES:
        assert f"{stage} {gpu_check.stage_cap(stage)} s" in doc.replace("\n", " ")
        for step in gpu_check.STAGES[stage]:
            assert re.search(rf"^{stage}\s.*\s{step.timeout_s}$", doc, re.M), (stage, step.name)
    assert f"= {plan['total_s']} s of the 900 s, {plan['spare_s']} s spare" in doc.replace("\n", " ")


@pytest.mark.parametrize("stage", list(gpu_check.STAGES))
def test_no_stage_leaves_more_files_than_come_back(stage):
    names = gpu_check.returned_files(stage)
    assert len(names) <= LIMITS["files_back"] and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)  # plain names, no folders


# ---------------------------------------------------------------------------
# Dry runs: the real driver, CPU stand-ins, no CuPy
# ---------------------------------------------------------------------------
def _run_script(*args, out, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("stage", list(gpu_check.STAGES))
def test_a_dry_run_writes_the_log_and_json_of_every_step(stage, tmp_path):
    out = tmp_path / "out"
    result = _run_script("--dry-run", stage, out=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(gpu_check.returned_files(stage)) and {f"{stage}.log", f"{stage}.json"} <= set(files)
    assert all(p.is_file() and p.stat().st_size < 1 << 20 for p in out.iterdir())  # small: no checkpoints here
    status = json.loads((out / f"{stage}.json").read_text())
    assert status["finished"] and status["dry_run"] and status["cap_s"] == gpu_check.stage_cap(stage)
    assert [s["name"] for s in status["steps"]] == [s.name for s in gpu_check.STAGES[stage]]
    assert all(s["status"] == "ok" and s["rc"] == 0 and s["seconds"] < s["timeout_s"] for s in status["steps"])
    log = (out / f"{stage}.log").read_text()
    for step in gpu_check.STAGES[stage]:
        assert f"== {stage}/{step.name}: ok (exit 0)" in log
    assert f"{stage}: " in result.stdout.splitlines()[-1]  # the one-line summary ends the output
    if stage == "tests":
        assert status["steps"][0]["result"]["cupy_available"] is False  # the probes' results are in the JSON
        assert "cnn_float64_train_step_first" in status["steps"][1]["result"]
    if stage == "bench":
        assert json.loads((out / "bench_64.json").read_text())["rows"]
    if stage == "examples":
        assert "test" in json.loads((out / "example_cnn.json").read_text())  # metrics came back, not the run


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"echo started; sleep 60 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        rc, seconds = gpu_check.run_step(["bash", "-c", script], dict(os.environ), 2, log)
    assert rc == 124 and seconds < 20 and time.monotonic() - started < 20
    assert "started" in (tmp_path / "log").read_text()
    assert _ends_within(int(pidfile.read_text()), 10)  # the background sleep went with its group


def _ends_within(pid, seconds) -> bool:
    """Whether process ``pid`` is gone (or a zombie waiting to be reaped) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_a_stage_killed_half_way_leaves_what_it_wrote(tmp_path):
    out, pidfile = tmp_path / "out", tmp_path / "pid"
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from benchmarks import gpu_check
        step = gpu_check.Step
        gpu_check.STAGES["killed"] = (
            step("first", 20, 1, ("bash", "-c", "echo first step output"), ()),
            step("second", 20, 1, ("bash", "-c", "echo $$ > {pidfile}; echo second started; exec sleep 20"), ()),
        )
        gpu_check.run_stage("killed", Path({str(out)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        log = out / "killed.log"
        while not (pidfile.exists() and pidfile.read_text().strip() and "second started" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the second step never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # as the device tool does at its limit
        proc.wait()
    finally:
        if pidfile.exists() and pidfile.read_text().strip():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)  # the step's own group, started above
            except ProcessLookupError:
                pass
    status = json.loads((out / "killed.json").read_text())
    assert not status["finished"]
    assert [(s["name"], s["status"]) for s in status["steps"]] == [("first", "ok"), ("second", "running")]
    log = (out / "killed.log").read_text()
    assert "first step output" in log and "== killed/first: ok (exit 0)" in log and "second started" in log


def test_the_examples_stage_keeps_big_files_out_of_out(tmp_path):
    for step in gpu_check.STAGES["examples"]:
        command = " ".join(step.command)
        assert "--out {runs}/" in command and "{out}" not in command


def test_a_data_folder_is_only_for_the_examples(tmp_path):
    result = _run_script("bench", "some/folder", out=tmp_path, timeout=60)
    assert result.returncode == 2 and "examples stage only" in result.stderr


# ---------------------------------------------------------------------------
# Every GPU-only test is selected by -m gpu
# ---------------------------------------------------------------------------
def _gpu_tests_without_the_marker():
    """(file, test) for every test that skips without a GPU but is not marked ``gpu``."""
    missing = []
    for path in sorted((ROOT / "tests").rglob("test*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                                  for t in node.targets)
                            and "mark.gpu" in ast.unparse(node.value) for node in tree.body)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            skips_without_gpu = any(re.search(r"skipif\(\s*not [\w.]*gpu_available\(\)", d) for d in decorators)
            for stmt in node.body:
                if isinstance(stmt, ast.If) and re.fullmatch(r"not [\w.]*gpu_available\(\)", ast.unparse(stmt.test)):
                    skips_without_gpu |= "skip(" in ast.unparse(stmt.body[0])
            if skips_without_gpu and not module_marked and not any(re.search(r"mark\.gpu\b", d) for d in decorators):
                missing.append((str(path.relative_to(ROOT)), node.name))
    return missing


def test_every_test_that_needs_a_gpu_is_marked_gpu():
    assert _gpu_tests_without_the_marker() == []
