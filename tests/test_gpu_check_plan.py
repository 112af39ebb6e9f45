"""benchmarks/gpu_check.sh fits the device machine, on paper and in a dry run on the CPU.

The GPU is lent for 15 minutes in all, 10 per command, and returns at most 8
small files per call; a machine left idle for 30 s goes back, and the next
call starts a bare one.  So the check is one call, and its plan is checked
here where it costs nothing: the steps' timeouts against those limits, the
whole call run with ``--dry-run`` (the same driver, logs and JSON, with CPU
stand-ins for the GPU commands), a step that overruns its timeout, a call
killed half-way, and the Python the script picks.  Last, every test that
skips without a GPU must carry the ``gpu`` marker, since ``gpu_check.sh``
selects the GPU tests with ``-m gpu``: one without it never runs anywhere.
"""
import ast
import json
import os
import pathlib
import re
import shutil
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


def test_the_whole_check_is_one_call_of_at_most_540_s_that_leaves_time_for_a_rerun():
    plan = gpu_check.plan()
    assert plan["call_s"] == sum(step.timeout_s for step in gpu_check.STEPS) <= gpu_check.CALL_CAP_S <= 540
    assert gpu_check.CALL_CAP_S + 30 <= LIMITS["per_call_s"]  # the device tool's timeout_s: the cap plus a margin
    assert plan["total_s"] == gpu_check.START_UP_S + plan["call_s"] and gpu_check.START_UP_S >= 60
    assert plan["spare_s"] >= 200, plan  # one rerun of a failed step (--only), with a fresh machine's start-up
    for step in gpu_check.STEPS:
        assert 0 < step.expected_s < step.timeout_s, step


def test_the_call_starts_with_the_conformance_replay_and_warms_up_float32_only():
    assert gpu_check.STEP_NAMES[0] == "conformance"
    assert "conformance_replay.py" in " ".join(gpu_check.STEPS[0].command)
    budget = gpu_check.STEPS[0].command[gpu_check.STEPS[0].command.index("--budget") + 1]
    assert float(budget) + 5 <= gpu_check.STEPS[0].timeout_s  # the replay stops itself before its step's cap
    source = pathlib.Path(gpu_check.__file__).read_text()
    warmup = source[source.index("def probe_warmup"):source.index("def _compiled")]
    assert 'for dtype in ("float32",)' in warmup and '"float64"' not in warmup  # the dry run checks it ran so


def test_the_written_plan_matches_the_code():
    doc = gpu_check.__doc__
    plan = gpu_check.plan()
    for step in gpu_check.STEPS:
        assert re.search(rf"^{step.name}\s.*\s{step.timeout_s}$", doc, re.M), step.name
    flat = " ".join(doc.split())
    assert f"Sum of the caps: {plan['call_s']} s" in flat and f"one call of at most {plan['call_s']} s" in flat.lower()
    assert f"the call takes {plan['total_s']} of the session's 900 s: {plan['spare_s']} s spare" in flat
    for name in gpu_check.returned_files():
        assert f"``{name}``" in doc, name  # the header says what comes back
    assert f"{len(gpu_check.returned_files())} files" in flat


def test_no_more_files_are_left_than_come_back():
    names = gpu_check.returned_files()
    assert len(names) <= LIMITS["files_back"] and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)  # plain names, no folders


def test_the_script_runs_the_projects_python(tmp_path):
    """The system python3 lacks tinynet's dependencies (25 collection errors): the venv's Python first."""
    def chosen(folder, venv, python=None):
        copy = tmp_path / folder / "benchmarks"
        copy.mkdir(parents=True)
        shutil.copy(ROOT / "benchmarks" / "gpu_check.sh", copy)
        (copy / "gpu_check.py").write_text("import sys; print(sys.argv[1:])\n")
        if venv:
            (copy.parent / ".venv" / "bin").mkdir(parents=True)
            fake = copy.parent / ".venv" / "bin" / "python"
            fake.write_text("#!/bin/sh\necho venv-python \"$@\"\n")
            fake.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
        if python:
            env["PYTHON"] = python
        return subprocess.run(["bash", str(copy / "gpu_check.sh"), "--plan"], capture_output=True, text=True,
                              env=env, timeout=30).stdout

    assert chosen("a", venv=True).startswith("venv-python -u benchmarks/gpu_check.py --plan")
    assert chosen("b", venv=False).strip() == "['--plan']"  # python3
    assert chosen("c", venv=True, python=sys.executable).strip() == "['--plan']"  # $PYTHON first


# ---------------------------------------------------------------------------
# A dry run: the real driver, CPU stand-ins, no GPU
# ---------------------------------------------------------------------------
def _run_script(*args, out, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    return _run_script("--dry-run", out=out), out


def test_a_dry_run_writes_the_log_and_json_of_every_step(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert sorted(files) == sorted(gpu_check.returned_files())
    assert all(p.is_file() and p.stat().st_size < 1 << 20 for p in out.iterdir())  # small: no checkpoints here
    status = json.loads((out / gpu_check.STATUS).read_text())
    assert status["finished"] and status["dry_run"] and status["cap_s"] == gpu_check.plan()["call_s"]
    assert status["python"] == sys.executable
    assert [s["name"] for s in status["steps"]] == list(gpu_check.STEP_NAMES)
    assert all(s["status"] == "ok" and s["rc"] == 0 and s["seconds"] < s["timeout_s"] for s in status["steps"])
    log = (out / gpu_check.LOG).read_text()
    for step in gpu_check.STEPS:
        assert f"== {step.name}: ok (exit 0)" in log
    assert result.stdout.splitlines()[-1].startswith("gpu_check: conformance ok")  # the one-line summary ends it
    steps = {s["name"]: s for s in status["steps"]}
    assert steps["env"]["result"]["cupy_available"] is False  # the probes' results are in the JSON
    assert "cnn_float32_train_step_first" in steps["warmup"]["result"]
    assert not any("float64" in key for key in steps["warmup"]["result"])
    assert steps["conformance"]["result"]["differences"] == 0 and steps["conformance"]["result"]["replayed"] > 100
    assert json.loads((out / "conformance.json").read_text())["diffs"] == []
    assert json.loads((out / "bench_64.json").read_text())["rows"]
    assert "test" in json.loads((out / "example_resnet.json").read_text())  # metrics came back, not the run


def test_each_result_is_printed_as_it_comes(dry_run):
    result, _ = dry_run
    lines = result.stdout.splitlines()
    env = lines[lines.index(next(line for line in lines if line.startswith("== env (")))
                :lines.index(next(line for line in lines if line.startswith("== env: ")))]
    results = [line for line in env if line.startswith("RESULT ")]
    assert len(results) >= 6 and all(len(json.loads(line[len("RESULT "):])) == 1 for line in results)
    assert json.loads(results[0][len("RESULT "):]).keys() == {"python"}  # the first item, not a summary at the end


def test_only_reruns_the_named_steps(tmp_path):
    result = _run_script("--dry-run", "--only", "env", out=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    status = json.loads((tmp_path / gpu_check.STATUS).read_text())
    assert [s["name"] for s in status["steps"]] == ["env"] and status["cap_s"] == 15
    bad = _run_script("--only", "tests,nothing", out=tmp_path, timeout=60)
    assert bad.returncode == 2 and "unknown step(s) nothing, tests" in bad.stderr


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


def test_a_call_killed_half_way_leaves_what_it_wrote(tmp_path):
    out, pidfile = tmp_path / "out", tmp_path / "pid"
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from benchmarks import gpu_check
        step = gpu_check.Step
        gpu_check.STEPS = (
            step("first", 20, 1, ("bash", "-c", "echo first step output"), ()),
            step("second", 20, 1, ("bash", "-c", "echo $$ > {pidfile}; echo second started; exec sleep 20"), ()),
        )
        gpu_check.run_all(Path({str(out)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        log = out / gpu_check.LOG
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
    status = json.loads((out / gpu_check.STATUS).read_text())
    assert not status["finished"]
    assert [(s["name"], s["status"]) for s in status["steps"]] == [("first", "ok"), ("second", "running")]
    log = (out / gpu_check.LOG).read_text()
    assert "first step output" in log and "== first: ok (exit 0)" in log and "second started" in log


def test_big_files_stay_out_of_out():
    for step in gpu_check.STEPS:
        command = " ".join(step.command)
        assert "{runs}" not in command or "{out}" not in command
        if "examples/" in command:
            assert "--out {runs}/" in command


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
