"""scripts/compare_in_process.py: two settings, or this checkout's code and a git revision's,
alternately in one process; bad input refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compare_in_process.py"
QUICK = ["--model", "seed", "--batch", "4", "--rounds", "2", "--interleave", "2"]


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def medians(stdout: str) -> dict:
    return {name.strip(): float(value.replace(",", "")) for name, value in re.findall(r"^  (.+?)\s+median ([\d,]+) samples/s", stdout, flags=re.M)}


def test_a_setting_is_compared_with_its_alternative():
    result = run_script("--what", "bn-relu", *QUICK)
    assert result.returncode == 0, result.stderr
    rates = medians(result.stdout)
    assert set(rates) == {"fused", "separate"} and all(rate > 0 for rate in rates.values())
    assert re.search(r"fused / separate: \d+\.\d{3}$", result.stdout.strip())


def test_this_checkout_is_compared_with_a_revision():
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    result = run_script("--against", "HEAD", *QUICK)
    assert result.returncode == 0, result.stderr
    rates = medians(result.stdout)
    assert set(rates) == {"this checkout", "HEAD"} and all(rate > 0 for rate in rates.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--against", "no-such-revision"], "--against no-such-revision:"),
        (["--what", "fusion", "--against", "HEAD"], "not allowed with argument"),
        (["--what", "fusion", "--batch", "0"], "--batch and --rounds must be >= 1"),
    ],
)
def test_bad_input_is_refused_in_one_line(args, message):
    result = run_script(*args, "--rounds", "1")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
