"""tinynet.cores: the thread count on an idle and on a busy machine (issue 23)."""
import os
import subprocess
import sys
import time

import pytest

from tinynet import cores

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")


def test_parse_threads():
    assert cores.parse_threads("auto") == "auto" and cores.parse_threads(" AUTO ") == "auto"
    assert cores.parse_threads("3") == 3 and cores.parse_threads(1) == 1
    for bad in ("0", "-1", "two", "", None, "1.5", "5000"):
        with pytest.raises(ValueError, match="auto"):
            cores.parse_threads(bad)


@pytest.mark.parametrize("others, total, free", [
    (None, 2, 2), (0.0, 2, 2), (0.3, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (1.9, 2, 1), (5.0, 2, 1),
    (0.4, 8, 8), (2.5, 8, 5), (0.0, 1, 1)])
def test_free_cores_counts_a_core_taken_from_half_of_it(others, total, free):
    assert cores.free_cores(others, total) == free


@linux_only
def test_a_spinning_process_is_seen_and_this_process_own_work_is_not():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        assert cores.other_processes_cores(0.5) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


class FakeMachine:
    """/proc/stat and os.times as functions of a clock that the test moves."""

    def __init__(self, monkeypatch):
        self.now, self.system, self.own = 0.0, 0.0, 0.0
        self.set = []
        monkeypatch.setattr(cores.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(cores.time, "sleep", self.run_for)
        monkeypatch.setattr(cores, "_system_busy_seconds", lambda: self.system)
        monkeypatch.setattr(cores, "_own_busy_seconds", lambda: self.own)
        monkeypatch.setattr(cores, "available_cores", lambda: 2)
        monkeypatch.setattr(cores, "set_threads", self.set.append)
        self.others = 0.0  # cores' worth other programs use
        self.mine = 1.0  # cores' worth this process uses

    def run_for(self, seconds):
        self.now += seconds
        self.own += self.mine * seconds
        self.system += (self.mine + self.others) * seconds


def test_auto_starts_with_the_free_cores_and_follows_the_machine(monkeypatch):
    machine = FakeMachine(monkeypatch)
    machine.others, machine.mine = 1.0, 0.0
    lines = []
    governor = cores.ThreadGovernor("auto", log=lines.append, recheck=10)
    assert governor.threads == 1 and machine.set == [1] and "1.0 of 2 cores" in governor.reason

    machine.others, machine.mine = 0.0, 2.0  # the other program ended; this one computes on both cores
    machine.run_for(5)
    governor.tick()
    assert governor.threads == 1  # not yet: a look every 10 s
    machine.run_for(5)
    governor.tick()
    assert governor.threads == 2 and machine.set == [1, 2] and governor.changes == 1
    assert lines == ["threads: 1 -> 2 (other programs used 0.0 of 2 cores over the last 10 s)"]

    machine.others, machine.mine = 0.9, 1.1  # another program shares the machine again
    machine.run_for(10)
    governor.tick()
    assert governor.threads == 1 and machine.set == [1, 2, 1]
    machine.run_for(10)  # this process's own use never counts as another program's
    machine.others, machine.mine = 0.0, 1.0
    machine.run_for(10)
    governor.tick()
    assert governor.threads == 2


def test_a_fixed_count_never_changes(monkeypatch):
    machine = FakeMachine(monkeypatch)
    machine.others = 2.0
    governor = cores.ThreadGovernor(2)
    machine.run_for(60)
    governor.tick()
    assert governor.threads == 2 and machine.set == [2] and governor.changes == 0


def test_set_threads_sets_the_blas_pool_and_tinynets_own():
    from threadpoolctl import threadpool_info

    from tinynet import backend

    before = backend.num_threads()
    blas_before = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    try:
        cores.set_threads(1)
        assert backend.num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    finally:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=max(blas_before or [1]), user_api="blas")
        backend.set_num_threads(None if before == cores.available_cores() else before)


def test_the_training_command_takes_threads_and_refuses_a_bad_count(tmp_path):
    from fault_inject import QUICK, run_cli

    bad = run_cli("cnn", "--threads", "0", "--out", tmp_path / "bad", *QUICK)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--threads" in bad.stderr
    good = run_cli("cnn", "--threads", "1", "--out", tmp_path / "one", *QUICK)
    assert good.returncode == 0, good.stderr
    assert "threads: 1 CPU thread (--threads 1)" in good.stdout
    import json

    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["threads"] == 1 and metrics["threads_setting"] == "1" and metrics["threads_changes"] == 0


def test_threads_default_comes_from_the_environment(monkeypatch):
    import argparse

    from tinynet.cli import add_threads_argument

    monkeypatch.setenv("TINYNET_THREADS", "3")
    parser = argparse.ArgumentParser()
    add_threads_argument(parser)
    assert parser.parse_args([]).threads == "3" and parser.parse_args(["--threads", "auto"]).threads == "auto"
    monkeypatch.delenv("TINYNET_THREADS")
    parser = argparse.ArgumentParser()
    add_threads_argument(parser)
    assert parser.parse_args([]).threads == "auto"
