"""The program end to end, as a process: graded output, determinism, resuming, saving, learning on the real data."""
import csv
import glob
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest

from conftest import ROOT, SHARED_OMNIGLOT, run_program
from learning_to_learn import metric_names, model_for_training, parse_args
from long_runs import save_uncompiled
from omniglot_dataset import write_atomically

NUMBER = r"\d+\.\d{4}"
NAMES = metric_names(images_per_class=10)
GRADED_LINE = re.compile(
    r"Epoch (\d+)/(\d+) " + " - ".join(f"{name}: {NUMBER}" for name in NAMES + [f"val_{n}" for n in NAMES]))


def graded_output(omniglot_npz, *flags):
    result = run_program(*flags, data=omniglot_npz)
    assert result.returncode == 0, result.stderr[-3000:]
    # A quiet start: no Python warnings, no TensorFlow errors or warnings from C++ (E0000 ..., W0000 ...).
    assert not re.search(r"Warning|^[EW]\d{4} ", result.stderr, re.MULTILINE), result.stderr[-3000:]
    return result.stdout


def metrics_of(line):
    return {name: float(value) for name, value in re.findall(r"(\w+): (\d+\.\d+)", line)}


@pytest.mark.slow
@pytest.mark.parametrize("classes", [2, 5])
def test_recodex_prints_one_graded_line_per_epoch_identically_twice(omniglot_npz, classes):
    flags = ["--recodex", "--train_episodes=160", "--test_episodes=160", "--epochs=3", f"--classes={classes}"]
    first = graded_output(omniglot_npz, *flags)
    lines = first.splitlines()
    assert len(lines) == 3, first
    for epoch, line in enumerate(lines, start=1):
        match = GRADED_LINE.fullmatch(line)
        assert match and match.groups() == (str(epoch), "3"), line
        metrics = metrics_of(line)
        assert all(0 <= value <= 1 for name, value in metrics.items() if "loss" not in name), line
        assert all(0 < metrics[loss] < math.inf for loss in ["loss", "val_loss"]), line
    assert graded_output(omniglot_npz, *flags) == first


@pytest.mark.slow
def test_learns_two_way_episodes_well_above_chance(omniglot_npz):
    lines = graded_output(omniglot_npz, "--recodex", "--classes=2", "--threads=0",
                        "--train_episodes=2000", "--test_episodes=320", "--epochs=2").splitlines()
    last = metrics_of(lines[-1])
    # Chance is 0.5, and 320 episodes of 20 steps put its noise near 0.01: 0.55 is well above it.
    assert last["val_acc"] > 0.55 and last["val_acc2"] > 0.55, lines[-1]
    # A class seen for the first time has the label not seen yet: learned, that gives 0.75, chance 0.5.
    assert last["val_acc1"] > 0.65, lines[-1]


@pytest.mark.slow
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(omniglot_npz, tmp_path):
    # With a decaying learning rate, a resumed run must also go on along the same curve.
    flags = ["--recodex", "--classes=2", "--train_episodes=160", "--test_episodes=160", "--epochs=3",
             "--learning_rate_decay=cosine"]
    uninterrupted = graded_output(omniglot_npz, *flags).splitlines()

    command = [sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags, f"--checkpoint_dir={tmp_path}"]
    env = {**os.environ, "OMNIGLOT_DATA": omniglot_npz}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as run:
        first_line = run.stdout.readline()  # printed once the epoch's checkpoint is saved
        run.send_signal(signal.SIGKILL)
    assert first_line.rstrip("\n") == uninterrupted[0]

    resumed = graded_output(omniglot_npz, *flags, f"--checkpoint_dir={tmp_path}",
                          f"--save_model={tmp_path / 'model.keras'}").splitlines()
    assert resumed == uninterrupted[1:], "the resumed run must print only the epochs it trains, identically"

    # The saved model holds no optimizer, and gives the last epoch's validation metrics again.
    with zipfile.ZipFile(tmp_path / "model.keras") as archive, h5py.File(archive.open("model.weights.h5")) as weights:
        assert "optimizer" not in weights
    evaluation = graded_output(omniglot_npz, "--recodex", "--classes=2", "--test_episodes=160",
                             f"--evaluate={tmp_path / 'model.keras'}").splitlines()
    last = uninterrupted[-1]
    assert evaluation == ["Test " + last[last.index("val_"):].replace("val_", "")]


def test_threads_beyond_the_cores_run_as_the_cores_do(omniglot_npz, tmp_path):
    # In the fast suite although a process: it takes seconds, where a loop of the fused recurrence for each of
    # 1000 threads ran past 120 s here (a training run past 600 s, mapping 22 GB).
    episodes = ["--classes=2", "--images_per_class=2"]
    save_uncompiled(model_for_training(parse_args([*episodes, "--lstm_dim=4", "--cell_size=2"])),
                    str(tmp_path / "model.keras"))
    started = time.monotonic()
    result = run_program(*episodes, "--test_episodes=16", "--threads=1000", f"--evaluate={tmp_path / 'model.keras'}",
                         data=omniglot_npz, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("Test loss: "), result.stderr[-3000:]
    assert time.monotonic() - started < 60


def test_atomic_write_keeps_the_old_file_when_a_save_fails(tmp_path):
    target = tmp_path / "checkpoint.weights.h5"
    target.write_text("previous checkpoint")

    def broken_save(path):
        open(path, "w").write("half a checkp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(target), broken_save, suffix=".weights.h5")
    assert target.read_text() == "previous checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.weights.h5"]

    umask = os.umask(0o027)
    try:
        write_atomically(str(target), lambda path: open(path, "w").write("new checkpoint"), suffix=".weights.h5")
    finally:
        os.umask(umask)
    assert target.read_text() == "new checkpoint" and os.listdir(tmp_path) == ["checkpoint.weights.h5"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o640), "the file's mode follows the umask, as open()'s"


@pytest.mark.slow
def test_images_per_class_below_ten_reports_no_acc10(omniglot_npz):
    result = run_program("--recodex", "--images_per_class=3", "--train_episodes=16", "--test_episodes=16",
                         "--epochs=1", data=omniglot_npz)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no class appears 10 times in an episode: only loss, acc, acc1, acc2 are reported" in result.stderr
    names = re.findall(r"(\w+): \d", result.stdout)
    assert names == ["loss", "acc", "acc1", "acc2", "val_loss", "val_acc", "val_acc1", "val_acc2"]


SHIPPED_MODELS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "models", "*.keras")))


def test_the_best_recipes_model_ships():
    # and so evaluates to its run's last epoch in the next test
    with open(os.path.join(ROOT, "benchmarks", "results.py")) as results:
        best_run = next(line.split('"')[1] for line in results if line.startswith("BEST_RUN = "))
    path = os.path.join(ROOT, "benchmarks", "models", f"{best_run}.keras")
    assert path in SHIPPED_MODELS, f"the headline's model {path} must ship"


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED_MODELS, ids=os.path.basename)
def test_each_shipped_model_evaluates_to_its_runs_last_epoch(omniglot_npz, path):
    assert_evaluates_to_its_runs_last_epoch(omniglot_npz, path)


def shipped_models_commands():
    """(command, the lines it printed) of each command shown in benchmarks/models/README.md."""
    text = open(os.path.join(ROOT, "benchmarks", "models", "README.md")).read()
    shown = "\n".join(re.findall(r"^```\n(.*?)^```", text, re.MULTILINE | re.DOTALL))
    return [(command.split("#")[0].split(), printed.splitlines())
            for command, printed in re.findall(r"^\$ python3 (.*)\n((?:[^$\n].*\n)*)", shown, re.MULTILINE)]


@pytest.mark.slow
@pytest.mark.parametrize("command, printed", shipped_models_commands(), ids=lambda value: " ".join(value)[:80])
def test_each_shipped_models_command_prints_what_its_readme_shows(omniglot_npz, command, printed):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMNIGLOT_DATA": str(omniglot_npz),
                                 "OMNIGLOT_RUNS": os.path.join(SHARED_OMNIGLOT, "all_runs.zip")})
    assert result.returncode == 0, result.stderr[-3000:]
    # Of each line, what a terminal would show last, less the progress bars.
    lines = [line.split("\r")[-1] for line in re.sub(r"\x1b\[[0-9;]*m|.\x08", "", result.stdout).splitlines()]
    lines = [line for line in lines if line and not re.match(r"\s*\d+/\d+ ", line)]
    assert [re.sub(r"\d+\.\d+", "#", line) for line in lines] == [re.sub(r"\d+\.\d+", "#", line) for line in printed]
    # Another CPU adds in another order: a few answers of thousands may flip (a Lake run's one of 20: 5 points).
    for line, shown in zip(lines, printed, strict=True):
        tolerance = 5.0 if line.startswith("run") else 0.3 if "%" in line else 0.003
        found, expected = (np.array(re.findall(r"\d+\.\d+", text), float) for text in (line, shown))
        np.testing.assert_allclose(found, expected, atol=tolerance, err_msg=line)


def assert_evaluates_to_its_runs_last_epoch(omniglot_npz, path):
    with open(os.path.join(ROOT, "benchmarks", "runs.csv"), newline="") as file:
        recorded = {row["name"]: row for row in csv.DictReader(file)}[os.path.basename(path)[:-len(".keras")]]
    episodes = [flag for flag in recorded["flags"].split() if flag.split("=")[0] in ["--classes", "--images_per_class"]]
    lines = graded_output(omniglot_npz, "--recodex", *episodes, f"--evaluate={path}")
    names = [name for name in NAMES if recorded[f"val_{name}"]]  # no 10th occurrence in episodes of 6 drawings
    assert lines.splitlines() == ["Test " + " - ".join(f"{name}: {recorded[f'val_{name}']}" for name in names)]


# Every backend

BACKENDS = [backend for backend in ["tensorflow", "jax", "torch"] if importlib.util.find_spec(backend)]
TINY_RUN = ["--recodex", "--classes=2", "--train_episodes=32", "--test_episodes=32", "--lstm_dim=8", "--epochs=2"]


def on_backend(backend, omniglot_npz, *flags, environment=()):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags],
                            env={**os.environ, "OMNIGLOT_DATA": omniglot_npz, "KERAS_BACKEND": backend,
                                 **dict(environment)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_runs(omniglot_npz, tmp_path_factory):
    """`run(backend)`: the graded lines of TINY_RUN on that backend and the model it saved, each backend run once
    for all the tests below (a run starts a process of 10-20 s)."""
    folder, runs = tmp_path_factory.mktemp("tiny_runs"), {}

    def run(backend):
        if backend not in runs:
            path = folder / f"{backend}.keras"
            runs[backend] = on_backend(backend, omniglot_npz, *TINY_RUN, f"--save_model={path}").stdout, path
        return runs[backend]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", [backend for backend in BACKENDS if backend != "tensorflow"])  # TensorFlow's above
def test_graded_lines_repeat_to_the_digit_on_each_backend(omniglot_npz, backend, tiny_runs):
    first, again = tiny_runs(backend)[0], on_backend(backend, omniglot_npz, *TINY_RUN).stdout
    assert len(first.splitlines()) == 2 and all(GRADED_LINE.fullmatch(line) for line in first.splitlines()), first
    assert again == first


@pytest.mark.slow
@pytest.mark.parametrize("trained_on", BACKENDS)
def test_a_model_saved_on_one_backend_evaluates_to_the_same_line_on_each(omniglot_npz, trained_on, tiny_runs):
    # The same weights and ops in float32: the backends' kernels add in their own orders, probabilities up to
    # 5e-6 apart (the shipped 5-way model, 64 episodes), and each metric is a mean of per-episode means summed
    # in its own order too: a value on a rounding tie (15/32 = 0.46875) may print either way, 1e-4 apart.
    lines, path = tiny_runs(trained_on)
    last = lines.splitlines()[-1]
    expected = metrics_of("Test " + last[last.index("val_"):].replace("val_", ""))
    for backend in set(BACKENDS) - {trained_on}:  # on its own, the validation of its last epoch
        line = on_backend(backend, omniglot_npz, "--recodex", "--classes=2", "--test_episodes=32",
                          f"--evaluate={path}").stdout
        assert line.startswith("Test ") and metrics_of(line).keys() == expected.keys(), line
        np.testing.assert_allclose(list(metrics_of(line).values()), list(expected.values()), rtol=0, atol=1.01e-4,
                                   err_msg=backend)


@pytest.mark.slow
@pytest.mark.skipif("jax" not in BACKENDS, reason="JAX is not installed")
def test_jax_splits_each_batch_across_its_devices_as_one_device_trains(omniglot_npz, tiny_runs):
    two_devices = [("XLA_FLAGS", "--xla_force_host_platform_device_count=2")]
    said = on_backend("jax", omniglot_npz, "--classes=2", "--train_episodes=16", "--test_episodes=16", "--epochs=1",
                      "--lstm_dim=8", environment=two_devices).stderr
    assert "learning_to_learn.py: training on jax, 2 CPU, each batch split across them\n" in said, said
    one, two = tiny_runs("jax")[0], on_backend("jax", omniglot_npz, *TINY_RUN, environment=two_devices).stdout
    # The same function, each device summing its share: the lines agree to rounding.
    np.testing.assert_allclose(*[[list(metrics_of(line).values()) for line in lines.splitlines()]
                                 for lines in (one, two)], atol=2e-4)
