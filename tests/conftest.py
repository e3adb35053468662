import functools
import http.server
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_OMNIGLOT = os.path.join(ROOT, "..", "shared", "omniglot")  # this project's release files, where present
sys.path.insert(0, ROOT)

# backends before Keras, as the program imports them: it quiets TensorFlow's start-up, here and in the programs
# the tests start, which inherit the setting (Keras's own import would set a louder one).
import backends  # noqa: E402, F401, I001
import keras  # noqa: E402
from omniglot_dataset import CACHE_FILE, DataError, Omniglot, cache_dir  # noqa: E402

# A test of TensorFlow's own path (its fused kernels, its kernels' precision), which other backends do not take.
tensorflow_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's own path")


@pytest.fixture(scope="session")
def omniglot_npz():
    """The real data set, found as the program finds it: OMNIGLOT_DATA, else the Keras cache, which the first
    run of the program writes (or this fixture, downloading)."""
    path = os.environ.get("OMNIGLOT_DATA") or os.path.join(cache_dir(), CACHE_FILE)
    if not os.path.exists(path):
        try:
            Omniglot()
        except DataError as error:
            pytest.fail(f"the real Omniglot data is needed: {error}")
    return os.path.abspath(path)


def run_program(*flags, data, cwd=None, timeout=600):
    """Runs learning_to_learn.py with `flags` and OMNIGLOT_DATA=`data`; returns the finished process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags],
                          env={**os.environ, "OMNIGLOT_DATA": str(data)}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def serve(tmp_path):
    """Serves the files of a folder over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "server"
    folder.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # Polled every 10 ms, not 0.5 s, for shutdown: each test that serves ends 0.5 s sooner.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
