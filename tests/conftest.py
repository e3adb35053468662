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

from learning_to_learn import build_model, compile_for_training, steps_per_epoch  # noqa: E402
from omniglot_dataset import CACHE_FILE, DataError, Omniglot, cache_dir  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts the program as a process (pytest -m 'not slow' skips it)")


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


def model_of(args, fused=True):
    """The program's model of the flags `args`, not compiled."""
    return build_model(args.classes, args.images_per_class, cnn_filters=args.cnn_filters, cnn_pooling=args.cnn_pooling,
                       lstm_dim=args.lstm_dim, cell_size=args.cell_size, read_heads=args.read_heads,
                       read_sharpness=args.read_sharpness, feature_match=args.feature_match,
                       feature_labels=args.feature_labels, fused=fused)


def compiled_model_of(args):
    """The program's model of the flags `args`, compiled as training compiles it."""
    decay_steps = args.epochs * steps_per_epoch(args.train_episodes, args.batch_size)
    return compile_for_training(model_of(args), args.images_per_class, args.learning_rate,
                                decay_steps=decay_steps if args.learning_rate_decay == "cosine" else None)


def run_program(*flags, data, cwd=None):
    """Runs learning_to_learn.py with `flags` and OMNIGLOT_DATA=`data`; returns the finished process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags],
                          env={**os.environ, "OMNIGLOT_DATA": str(data)}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
