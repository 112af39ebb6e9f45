"""Project plumbing: CI runs exactly the README's test command; no runtime import of PyTorch."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    quick = [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]
    return quick


def test_readme_gives_two_setup_commands_and_ci_runs_the_second_verbatim():
    main_job, tests = readme_commands()
    assert "examples/train_resnet.py" in main_job and "pip install -e ." in main_job
    assert "pytest" in tests and '".[test]"' in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the test command in .ci/run must be the README's, verbatim"


def test_tinynet_never_imports_torch():
    code = ("import sys, tinynet, tinynet.io, tinynet.data, tinynet.train, tinynet.experiment, tinynet.plots; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
