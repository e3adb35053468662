import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_OMNIGLOT = os.path.join(ROOT, "..", "shared", "omniglot")
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts the program as a process (pytest -m 'not slow' skips it)")


@pytest.fixture(scope="session")
def omniglot_npz():
    """The real data set: OMNIGLOT_DATA where set, else the copy in ../shared beside the project."""
    path = os.environ.get("OMNIGLOT_DATA") or os.path.join(SHARED_OMNIGLOT, "omniglot.npz")
    if not os.path.exists(path):
        pytest.fail(f"the real Omniglot data is needed at {path} (or set OMNIGLOT_DATA)")
    return os.path.abspath(path)


def run_program(*flags, data, cwd=None):
    """Runs learning_to_learn.py with `flags` and OMNIGLOT_DATA=`data`; returns the finished process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags],
                          env={**os.environ, "OMNIGLOT_DATA": str(data)}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
