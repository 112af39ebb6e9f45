"""Numeric options at huge finite values: a bound, and one line naming the option, exit 2 (issue 20).

``--time-budget 1e308`` passed the "positive and finite" check and ended in a NaN
traceback (``1e308 * 60`` seconds is infinite); ``--epochs 10**12`` or
``--batch-size 10**12`` were taken at their word.  Each option now has a bound.
"""
import importlib.util
import pathlib

import pytest

from fault_inject import call_main
from test_examples import run_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_resnet_bounds", ROOT / "examples" / "pretrain_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--time-budget", "1e308"], "--time-budget must be at most 5259600 minutes (ten years), got 1e+308"),
    (["--time-budget", "1e7"], "--time-budget must be at most 5259600 minutes (ten years), got 1e+07"),
    (["--epochs", str(10**12)], "--epochs must be at most 100000, got 1000000000000"),
    (["--batch-size", str(10**12)], "--batch-size must be at most 65536, got 1000000000000"),
    (["--lr", "1e308"], "--lr must be at most 10, got 1e+308"),
])
def test_pretrain_huge_values_are_one_line_exit_2(tmp_path, args, message):
    module = pretrain_script()
    parsed = module.build_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out"), *args])
    with pytest.raises(module.UsageError) as info:
        module.check_args(parsed)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pretrain_time_budget_1e308_is_one_line_exit_2(tmp_path):
    result = run_script("pretrain_resnet.py", "--time-budget", "1e308", "--data", tmp_path / "missing.zip",
                        "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr  # before the fix: NaN traceback once the budget was planned
    assert "--time-budget must be at most 5259600 minutes" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pretrain_largest_allowed_values_pass_the_checks(tmp_path):
    module = pretrain_script()
    parsed = module.build_parser().parse_args(
        ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--time-budget", "5259600", "--epochs", "100000",
         "--batch-size", "65536", "--lr", "10"])
    module.check_args(parsed)


@pytest.mark.parametrize("model, args, message", [
    ("cnn", ["--epochs", str(10**12)], "--epochs must be at most 100000, got 1000000000000"),
    ("resnet", ["--batch-size", str(10**12)], "--batch-size must be at most 65536, got 1000000000000"),
    ("cnn", ["--lr", "1e308"], "--lr must be at most 10, got 1e+308"),
])
def test_train_scripts_huge_values_are_one_line_exit_2(tmp_path, capsys, model, args, message):
    # a missing --data: before the fix, the one line named the folder (or training started)
    status, _, err = call_main(capsys, model, *args, "--data", tmp_path / "missing", "--out", tmp_path / "out")
    assert status == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
