"""The Python code of the repository passes ruff's lint and format check
(the settings are client/python/pyproject.toml's): the package, its tests,
the benchmarks and the golden-trace generator."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "client" / "python" / "pyproject.toml"
PATHS = [ROOT / "client" / "python", ROOT / "bench", ROOT / "tests" / "golden"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--config", str(CONFIG), *map(str, PATHS)],
        capture_output=True,
        text=True,
        # Ruff resolves the config's exclusions from the working directory.
        cwd=ROOT,
    )
    assert out.returncode == 0, "ruff %s:\n%s%s" % (" ".join(command), out.stdout, out.stderr)
