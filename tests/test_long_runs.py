"""A long run is never lost or silently wrong: the checkpoint knows its run, every write place is tried before
training, divergence and interruptions end it with one line, and what was saved stays intact.

Read-only and full file systems are tmpfs mounts, tried only where the tests run as root.
"""
import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import long_runs
from conftest import ROOT, run_program
from learning_to_learn import model_for_training, parse_args, parser, steps_per_epoch
from long_runs import (
    FLAGS,
    EpochCheckpoint,
    RunEnded,
    StopOnDivergence,
    Terminated,
    defaults,
    differing_flags,
    interrupt,
    print_unless_interrupted,
    run_flags,
    save_uncompiled,
    told_what_is_kept,
)
from omniglot_dataset import DataError

TINY = ["--classes=2", "--images_per_class=2", "--lstm_dim=4", "--cell_size=2", "--train_episodes=32"]
SMALL_RUN = ["--recodex", "--classes=2", "--train_episodes=64", "--test_episodes=16", "--lstm_dim=32"]
DEFAULTS = defaults(parser)


@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at `path` for the block; the test is skipped where mounting needs the root it lacks."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def refusal(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(argv)
    assert exit.value.code == 2
    prefix = f"{parser.prog}: error: "
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith(prefix), message
    return message[len(prefix):]


def checkpointed_model(args, directory):
    """A model of `args` and its EpochCheckpoint in `directory`, claimed and restored as main does."""
    model = model_for_training(args)
    checkpoint = EpochCheckpoint(str(directory), run_flags(args), DEFAULTS)
    checkpoint.claim()
    checkpoint.set_model(model)
    return model, checkpoint


def release(checkpoint):
    checkpoint.lock.close()


# The checkpoint knows its run.

def test_a_checkpoint_restores_weights_optimizer_state_and_epochs(tmp_path):
    args = parse_args(TINY)
    model, checkpoint = checkpointed_model(args, tmp_path)
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    for variable in model.weights + model.optimizer.variables:
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    checkpoint.on_epoch_end(2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "lock"]
    release(checkpoint)

    resumed, checkpoint = checkpointed_model(args, tmp_path)
    assert checkpoint.restore(resumed) == 3
    for saved, restored in zip(model.weights + model.optimizer.variables,
                               resumed.weights + resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(restored, saved)


@pytest.mark.parametrize("changed", ["--learning_rate=0.01", "--train_episodes=20", "--batch_size=8",
                                     "--lstm_dim=8", "--classes=3", "--learning_rate_decay=cosine",
                                     "--first_occurrence_weight=1.75"])
def test_a_checkpoint_of_other_flags_is_refused_naming_each_flag(changed, tmp_path):
    _, checkpoint = checkpointed_model(parse_args(TINY), tmp_path)
    checkpoint.on_epoch_end(0)
    release(checkpoint)
    flag, value = changed[2:].split("=")
    with pytest.raises(DataError) as refused:
        checkpointed_model(parse_args([*TINY, changed]), tmp_path)
    assert f"--{flag} {parse_args(TINY).__dict__[flag]} in the checkpoint, {value} now" in str(refused.value)
    assert str(refused.value).endswith("run its original command to continue it, "
                                       "or choose another --checkpoint_dir to start anew")
    assert "remove" not in str(refused.value) and "delete" not in str(refused.value)


def test_flags_that_do_not_change_the_run_may_differ():
    first = run_flags(parse_args([*TINY, "--threads=1"]))
    assert differing_flags(first, run_flags(parse_args([*TINY, "--threads=2", "--logdir=x", "--save_model=m.keras",
                                                        "--epochs=30"])), DEFAULTS) == []
    # With a decaying learning rate the number of epochs shapes every step's rate.
    cosine = run_flags(parse_args([*TINY, "--learning_rate_decay=cosine"]))
    longer = run_flags(parse_args([*TINY, "--learning_rate_decay=cosine", "--epochs=30"]))
    assert differing_flags(cosine, longer, DEFAULTS) == ["--epochs 20 in the checkpoint, 30 now"]


def test_a_flag_newer_than_the_checkpoint_counts_as_its_default_there():
    older = run_flags(parse_args(TINY))
    del older["cnn_filters"], older["feature_labels"]
    assert differing_flags(older, run_flags(parse_args(TINY)), DEFAULTS) == []
    newer = run_flags(parse_args([*TINY, "--feature_labels", "--cnn_filters=4,4"]))
    assert differing_flags(older, newer, DEFAULTS) == [
        "--cnn_filters 8,16,32 in the checkpoint, 4,4 now", "--feature_labels False in the checkpoint, True now"]


def test_a_checkpoint_flag_no_longer_known_is_ignored():
    older = {**run_flags(parse_args(TINY)), "read_match": False}  # a flag of an earlier build
    assert differing_flags(older, run_flags(parse_args(TINY)), DEFAULTS) == []


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    _, checkpoint = checkpointed_model(parse_args(TINY), tmp_path)
    with pytest.raises(DataError, match="another run is training into .*: let it finish, or choose another"):
        checkpointed_model(parse_args(TINY), tmp_path)
    release(checkpoint)  # as the kernel does for a run that ends or is killed
    checkpointed_model(parse_args(TINY), tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "cannot read the checkpoint .* \\(not an npz file\\); choose another --checkpoint_dir"),
    ("flipped byte", "cannot read the checkpoint .*CRC.*; choose another --checkpoint_dir"),
    ("no optimizer state", r"\(it holds \d+ arrays of weights and optimizer state, this model \d+\); choose another"),
    ("another shape", r"\(its variable_0 is float32 \(1, 3, 3, 1, 8\), this model's float32 \(3, 3, 1, 8\)\); "),
    ("not finite", r"\(it holds numbers that are not finite: it is damaged\); choose another --checkpoint_dir"),
])
def test_a_checkpoint_that_cannot_be_used_is_refused(damage, message, tmp_path):
    args = parse_args(TINY)
    model, checkpoint = checkpointed_model(args, tmp_path)
    model.optimizer.build(model.trainable_variables)
    checkpoint.on_epoch_end(0)
    release(checkpoint)
    path = tmp_path / "checkpoint.npz"
    arrays = dict(np.load(path))
    if damage == "garbage":
        path.write_text("not a checkpoint")
    elif damage == "flipped byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(data)
    elif damage == "no optimizer state":
        weights = len(model.weights)
        np.savez(path, **{key: value for key, value in arrays.items()
                          if not key.startswith("variable_") or int(key[9:]) < weights})
    elif damage == "another shape":
        arrays["variable_0"] = arrays["variable_0"][None]
        np.savez(path, **arrays)
    else:
        arrays["variable_0"] = arrays["variable_0"] * np.nan
        np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        resumed, checkpoint = checkpointed_model(args, tmp_path)
        checkpoint.restore(resumed)


def test_an_epoch_of_episodes_not_filling_the_last_batch_still_counts_that_batch():
    assert [steps_per_epoch(episodes, 16) for episodes in [1, 16, 20, 32, 33]] == [1, 1, 2, 2, 3]


# Every write place is tried before training.

@pytest.mark.parametrize("flag", ["--save_model=README.md/model.keras", "--checkpoint_dir=README.md/checkpoints",
                                  "--logdir=README.md/logs"])
def test_a_write_place_under_a_file_is_refused(flag, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    name, path = flag[2:].split("=")
    expected = "its folder does not exist" if name == "save_model" else f"{ROOT}/README.md is a file, not a folder"
    assert refusal([flag], capsys) == f"argument --{name}: invalid path {path!r}: " \
                                      f"{expected}"


@pytest.mark.parametrize("flag", ["--save_model={}/model.keras", "--checkpoint_dir={}/checkpoints",
                                  "--logdir={}/logs"])
def test_a_read_only_write_place_is_refused(flag, capsys, tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as folder:
        name, path = flag.format(folder)[2:].split("=")
        assert refusal([f"--{name}={path}"], capsys) == (
            f"argument --{name}: invalid path {path!r}: "
            f"cannot write in {folder} (Read-only file system)")


def test_an_unwritable_data_cache_is_refused_before_downloading(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("OMNIGLOT_DATA", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "file" / "keras"))
    monkeypatch.setenv("OMNIGLOT_URL", "http://127.0.0.1:9/")
    from omniglot_dataset import Omniglot
    with pytest.raises(DataError, match="cannot cache the data set in .*file/keras/datasets: .* is a file, not a "
                                        "folder; set KERAS_HOME to a writable folder, or OMNIGLOT_DATA"):
        Omniglot()
    # Keras's get_file would fall back to /tmp/.keras for a cache it cannot write: nothing may land there either.
    assert not os.path.exists("/tmp/.keras/datasets/images_background.zip")


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    model, checkpoint = checkpointed_model(parse_args(TINY), tmp_path)
    model.optimizer.build(model.trainable_variables)
    checkpoint.on_epoch_end(0)
    saved = (tmp_path / "checkpoint.npz").read_bytes()

    def full_disk(path, **arrays):
        open(path, "wb").write(b"half a checkp")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(RunEnded, match=r"cannot write the checkpoint .*checkpoint\.npz \(No space left on device\)"):
        checkpoint.on_epoch_end(1)
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "lock"]
    assert checkpoint.kept() == f"{tmp_path / 'checkpoint.npz'} keeps epoch 1: run the same command to resume"


# Divergence stops the run.

@pytest.mark.parametrize("loss", [float("nan"), float("inf"), 1.2e10])
def test_a_diverging_loss_ends_training_at_once(loss):
    stop = StopOnDivergence()
    stop.on_epoch_begin(4)
    stop.on_train_batch_end(0, {"loss": 1.61})  # near ln(5): training as usual
    with pytest.raises(RunEnded, match=r"training diverged in epoch 5: the loss was .* after batch 8; a smaller "
                                       r"--learning_rate is the likely cure"):
        stop.on_train_batch_end(7, {"loss": loss})


# The other ends.

def test_evaluate_refuses_training_flags(capsys, tmp_path):
    (tmp_path / "m.keras").write_text("")
    assert refusal([f"--evaluate={tmp_path / 'm.keras'}", "--save_model=m.keras", "--checkpoint_dir=c", "--epochs=3"],
                   capsys) == ("argument --evaluate: it only evaluates the saved model, so --epochs, "
                                    "--checkpoint_dir, --save_model would be ignored: leave them out")




@pytest.mark.slow
@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_how_to_resume(sent, status, omniglot_npz, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *SMALL_RUN, "--epochs=4",
               f"--checkpoint_dir={tmp_path}"]
    with subprocess.Popen(command, env={**os.environ, "OMNIGLOT_DATA": omniglot_npz}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as run:
        assert run.stdout.readline().startswith("Epoch 1/4 ")
        run.send_signal(sent)
        _, errors = run.communicate(timeout=120)
    assert run.returncode == status and "Traceback" not in errors, errors
    assert errors.splitlines()[-1] == ("learning_to_learn.py: interrupted after epoch 1; "
                                       "run the same command to resume")


@pytest.mark.slow
def test_a_diverging_run_ends_with_one_line_and_writes_nothing(omniglot_npz, tmp_path):
    result = run_program(*SMALL_RUN, "--epochs=2", "--learning_rate=1e9", "--checkpoint_dir=checkpoints",
                         "--save_model=model.keras", data=omniglot_npz, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("learning_to_learn.py: training diverged in epoch 1: the loss")
    assert result.stderr.splitlines()[-1].endswith("; no epoch is saved in checkpoints")
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"] and os.listdir(tmp_path / "checkpoints") == ["lock"]


@pytest.mark.slow
def test_a_disk_that_fills_in_epoch_2_keeps_epoch_1(omniglot_npz, tmp_path):
    # A checkpoint of this run takes about 460 kB: room for one, not for the next beside it.
    with tmpfs(tmp_path / "disk", "size=700k") as disk:
        result = run_program(*SMALL_RUN, "--epochs=3", f"--checkpoint_dir={disk}", data=omniglot_npz)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"learning_to_learn.py: cannot write the checkpoint {disk}/checkpoint.npz (No space left on device); "
            f"{disk}/checkpoint.npz keeps epoch 1: run the same command to resume")
        assert len(result.stdout.splitlines()) == 1
        assert sorted(os.listdir(disk)) == ["checkpoint.npz", "lock"]
        assert int(np.load(disk / "checkpoint.npz")["epochs"]) == 1


@pytest.mark.slow
def test_a_model_that_cannot_be_saved_leaves_the_checkpoint(omniglot_npz, tmp_path):
    with tmpfs(tmp_path / "disk", "size=100k") as disk:
        result = run_program(*SMALL_RUN, "--epochs=1", f"--checkpoint_dir={tmp_path / 'checkpoints'}",
                             f"--save_model={disk}/model.keras", data=omniglot_npz)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"learning_to_learn.py: cannot write the model {disk}/model.keras (No space left on device); "
            f"{tmp_path}/checkpoints/checkpoint.npz keeps epoch 1: run the same command to resume")
        assert os.listdir(disk) == []


# A checkpoint is read against what the program writes.

@pytest.fixture(scope="module")
def written_checkpoint(tmp_path_factory):
    """The bytes of a checkpoint of TINY after 1 epoch, as on_epoch_end writes it."""
    folder = tmp_path_factory.mktemp("written")
    model, checkpoint = checkpointed_model(parse_args(TINY), folder)
    model.optimizer.build(model.trainable_variables)
    checkpoint.on_epoch_end(0)
    release(checkpoint)
    return (folder / "checkpoint.npz").read_bytes()


def edited(arrays, edit):
    """The arrays of a checkpoint, edited with numpy as a user who "fixes" a run might."""
    arrays = dict(arrays)
    if edit == "no epochs":
        del arrays["epochs"]
    elif edit == "negative epochs":
        arrays["epochs"] = np.array(-1)
    elif edit == "epochs not a number":
        arrays["epochs"] = np.array("one")
    elif edit == "epochs not whole":
        arrays["epochs"] = np.array(1.5)
    elif edit == "more epochs than the run's":
        arrays["epochs"] = np.array(21)
    elif edit == "run a list":
        arrays["run"] = np.array("[1, 2]")
    elif edit == "run not JSON":
        arrays["run"] = np.array("{classes: 2")
    elif edit == "run of numbers":
        arrays["run"] = np.arange(3)
    elif edit == "a flag of another type":
        arrays["run"] = np.array(str(arrays["run"]).replace('"learning_rate": 0.001', '"learning_rate": "0.001"'))
    elif edit == "strings":
        arrays["variable_1"] = np.array(["a", "b"])
    elif edit == "a member more":
        arrays["notes"] = np.zeros(2)
    elif edit == "a variable less":
        del arrays["variable_1"]
    return arrays


@pytest.mark.parametrize("edit, reason", [
    ("no epochs", "it holds run, variable_0, .*; expected run, epochs, backend and variable_0 onwards"),
    ("negative epochs", "its epochs are -1; expected a whole number from 0 to 20"),
    ("epochs not a number", "its epochs are 'one'; expected a whole number from 0 to 20"),
    ("epochs not whole", "its epochs are 1.5; expected a whole number from 0 to 20"),
    ("more epochs than the run's", "its epochs are 21; expected a whole number from 0 to 20"),
    ("run a list", "its run is not a JSON object of flags"),
    ("run not JSON", "Expecting property name enclosed in double quotes"),
    ("run of numbers", "its run is not a JSON object of flags"),
    ("a flag of another type", "its run's --learning_rate is '0.001', not of the type of 0.001"),
    ("strings", "variable_1 hold no numbers"),
    ("a member more", "it holds epochs, notes, run, variable_0, .*; expected run, epochs, backend and variable_0 "),
    ("a variable less", "it holds epochs, run, variable_0, variable_10, .*; expected run, epochs, backend and "),
])
def test_an_edited_checkpoint_is_refused_before_the_model_is_built_and_left_as_it_is(edit, reason, written_checkpoint,
                                                                                     tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(written_checkpoint)
    np.savez(path, **edited(np.load(path), edit))
    before = sorted(os.listdir(tmp_path)), path.read_bytes()
    with pytest.raises(DataError, match=rf"^cannot read the checkpoint {path} \({reason}.*\); choose another "
                                        "--checkpoint_dir to start anew$"):
        EpochCheckpoint(str(tmp_path), run_flags(parse_args(TINY)), DEFAULTS).claim()
    assert (sorted(os.listdir(tmp_path)), path.read_bytes()) == (before[0] + ["lock"], before[1])


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch", None])
def test_a_checkpoint_resumes_on_the_backend_that_wrote_it_alone(backend, written_checkpoint, tmp_path):
    # Another backend's optimizer steps differ in their last bits: its run would not end as an uninterrupted one.
    # A checkpoint that names no backend is one of TensorFlow's, written before there was a choice.
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(written_checkpoint)
    with np.load(path) as saved:
        assert str(saved["backend"]) == keras.backend.backend()  # as the run writes it
        written = {name: array for name, array in saved.items() if name != "backend"}
    np.savez(path, **written, **({} if backend is None else {"backend": np.array(backend)}))
    checkpoint = EpochCheckpoint(str(tmp_path), run_flags(parse_args(TINY)), DEFAULTS)
    trained_on = backend or "tensorflow"
    if trained_on == keras.backend.backend():
        release(checkpoint.claim())
    else:
        with pytest.raises(DataError, match=rf"^{tmp_path} holds a run trained on Keras's {trained_on} backend: "
                                            rf"resume it there \(KERAS_BACKEND={trained_on}\), or choose another "):
            checkpoint.claim()


def test_a_switch_of_an_earlier_version_that_is_now_a_share_resumes_as_one(written_checkpoint, tmp_path):
    # --within_alphabet was a switch: its checkpoints hold false or true where runs now hold a share.
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(written_checkpoint)
    with np.load(path) as saved:
        written = dict(saved)
    run = str(written.pop("run"))
    assert '"within_alphabet": 0.0' in run
    for switch, accepted in [("false", True), ("true", False)]:
        np.savez(path, **written, run=np.array(run.replace('"within_alphabet": 0.0', f'"within_alphabet": {switch}')))
        checkpoint = EpochCheckpoint(str(tmp_path), run_flags(parse_args(TINY)), DEFAULTS)
        if accepted:
            checkpoint.claim()
            assert repr(checkpoint.saved[0]["within_alphabet"]) == "0.0"
            release(checkpoint)
        else:
            with pytest.raises(DataError, match=r"holds a run of other flags \(--within_alphabet 1.0 in the "
                                                r"checkpoint, 0.0 now\)"):
                checkpoint.claim()


def test_a_checkpoint_naming_a_flag_this_build_no_longer_has_resumes(written_checkpoint, tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(written_checkpoint)
    with np.load(path) as saved:
        written = dict(saved)
    run = json.loads(str(written.pop("run")))
    np.savez(path, **written, run=np.array(json.dumps({**run, "read_match": True, "memory_layout": "rows"})))
    model, checkpoint = checkpointed_model(parse_args(TINY), tmp_path)
    assert checkpoint.restore(model) == 1


def test_the_command_of_a_finished_run_says_its_epochs_are_done(tmp_path, capsys):
    args = parse_args([*TINY, "--epochs=2"])
    model, checkpoint = checkpointed_model(args, tmp_path)
    model.optimizer.build(model.trainable_variables)
    checkpoint.on_epoch_end(1)  # the last epoch
    release(checkpoint)
    resumed, checkpoint = checkpointed_model(args, tmp_path)
    assert checkpoint.restore(resumed) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"2 epochs are done in {tmp_path}: nothing to train."


def test_every_flag_of_the_run_changed_on_resume_is_refused_by_name(written_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(long_runs, "bfloat16_convolutions_problem", lambda: None)  # whatever this CPU
    saved = run_flags(parse_args([*TINY, "--learning_rate_decay=cosine"]))
    assert set(saved) == {flag for flag, role in FLAGS.items() if role.of_the_run}
    for flag in saved:
        action = next(action for action in parser._actions if action.dest == flag)
        if action.const is True:  # store_true
            changed = [f"--{flag}"]
        elif action.choices:
            changed = [f"--{flag}={next(choice for choice in action.choices if choice != saved[flag])}"]
        elif flag == "cnn_filters":
            changed = [f"--{flag}=4,4"]
        else:
            changed = [f"--{flag}={saved[flag] * 2 if saved[flag] else 1}"]
        now = run_flags(parse_args([*TINY, "--learning_rate_decay=cosine", *changed]))
        assert [difference.split()[0] for difference in differing_flags(saved, now, DEFAULTS)] == [f"--{flag}"], flag


def test_a_lock_or_checkpoint_that_is_no_file_is_refused(tmp_path, capsys):
    (tmp_path / "lock").mkdir()
    assert refusal([f"--checkpoint_dir={tmp_path}"], capsys) == (
        f"argument --checkpoint_dir: invalid path '{tmp_path}': its lock is a folder, not a file")
    with pytest.raises(DataError, match=f"^{tmp_path}/lock is a folder, not a file: choose another --checkpoint_dir$"):
        EpochCheckpoint(str(tmp_path), run_flags(parse_args(TINY)), DEFAULTS).claim()
    os.rmdir(tmp_path / "lock")
    os.mkfifo(tmp_path / "checkpoint.npz")  # reading it would wait for a writer for ever
    assert refusal([f"--checkpoint_dir={tmp_path}"], capsys) == (
        f"argument --checkpoint_dir: invalid path '{tmp_path}': its checkpoint.npz is a named pipe, not a file")
    with pytest.raises(DataError, match="checkpoint.npz is a named pipe, not a file: choose another"):
        EpochCheckpoint(str(tmp_path), run_flags(parse_args(TINY)), DEFAULTS).claim()


def test_what_killed_writes_left_is_removed_when_a_run_claims_the_folder(written_checkpoint, tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(written_checkpoint)
    (tmp_path / ".checkpoint.npz.k1ll3d.npz").write_bytes(written_checkpoint[:100])
    (tmp_path / "notes.txt").write_text("a user's own file")
    release(EpochCheckpoint(str(tmp_path), run_flags(parse_args(TINY)), DEFAULTS).claim())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "lock", "notes.txt"]


# The last line tells what is on disk at that moment.

def test_what_is_kept_is_read_from_disk(written_checkpoint, tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoint = EpochCheckpoint(str(folder), run_flags(parse_args(TINY)), DEFAULTS).claim()
    assert checkpoint.kept() == f"no epoch is saved in {folder}"
    (folder / "checkpoint.npz").write_bytes(written_checkpoint)
    assert checkpoint.kept() == f"{folder / 'checkpoint.npz'} keeps epoch 1: run the same command to resume"
    release(checkpoint)
    shutil.rmtree(folder)  # a folder removed while the run trains
    assert checkpoint.kept() == f"no epoch is saved in {folder}"


def interrupted_after_the_rename(monkeypatch, interruption):
    """os.replace as a signal arriving just after it would have it: the file in place, then the interruption."""
    rename = os.replace

    def replace(source, target):
        rename(source, target)
        raise interruption

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("interruption, status", [(KeyboardInterrupt(), 130), (Terminated(), 143)])
def test_a_signal_while_a_checkpoint_moves_into_place_ends_as_an_interruption(interruption, status, tmp_path,
                                                                              monkeypatch):
    model, checkpoint = checkpointed_model(parse_args(TINY), tmp_path)
    model.optimizer.build(model.trainable_variables)
    interrupted_after_the_rename(monkeypatch, interruption)
    with pytest.raises(RunEnded, match="^interrupted after epoch 1; run the same command to resume$") as ended:
        with told_what_is_kept(checkpoint):
            checkpoint.on_epoch_end(0)
    assert ended.value.status == status
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "lock"]
    assert int(np.load(tmp_path / "checkpoint.npz")["epochs"]) == 1


@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interruption_that_tensorflow_turned_into_another_error_still_ends_as_one(sent, status, monkeypatch):
    # Raised inside TensorFlow's C++ calls, KeyboardInterrupt comes out as a SystemError or ValueError.
    monkeypatch.setattr("long_runs.signals_received", [])
    with pytest.raises(ValueError, match="^not an interruption$"), told_what_is_kept(None):
        raise ValueError("not an interruption")
    with pytest.raises(RunEnded, match="^interrupted; nothing was saved$") as ended, told_what_is_kept(None):
        try:
            interrupt(sent, None)
        except KeyboardInterrupt:
            raise ValueError("Could not pack sequence.") from None
    assert ended.value.status == status


@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interruption_that_tensorflow_swallowed_still_ends_as_one(sent, status, monkeypatch):
    # Raised in a thread of tf.data's, KeyboardInterrupt can end fit's epoch early, as if the episodes ran out.
    monkeypatch.setattr("long_runs.signals_received", [])
    with told_what_is_kept(None):
        pass
    with pytest.raises(RunEnded, match="^interrupted; nothing was saved$") as ended, told_what_is_kept(None):
        try:
            interrupt(sent, None)
        except KeyboardInterrupt:
            pass
    assert ended.value.status == status


def test_a_signal_while_the_model_moves_into_place_says_it_is_saved(tmp_path, monkeypatch):
    model = model_for_training(parse_args(TINY))
    interrupted_after_the_rename(monkeypatch, Terminated())
    path = str(tmp_path / "model.keras")
    with pytest.raises(RunEnded, match=f"^interrupted; the trained model is in {path}$"):
        with told_what_is_kept(None, path):
            save_uncompiled(model, path)
    assert os.listdir(tmp_path) == ["model.keras"]
    with pytest.raises(RunEnded, match="^interrupted; nothing was saved$"):
        with told_what_is_kept(None, path):  # the model of an earlier run is not this one's
            raise KeyboardInterrupt


def test_an_exception_that_c_code_prints_is_not_printed_after_an_interruption(monkeypatch, capsys):
    # C code prints what it catches with PyErr_Print, which calls sys.excepthook: as PyRun_SimpleString does.
    monkeypatch.setattr("sys.excepthook", print_unless_interrupted)

    def print_from_c(message):
        assert ctypes.pythonapi.PyRun_SimpleString(f"raise SystemError('{message}')".encode()) == -1

    monkeypatch.setattr("long_runs.signals_received", [])
    print_from_c("not after a signal")
    assert capsys.readouterr().err.splitlines()[-1] == "SystemError: not after a signal"
    monkeypatch.setattr("long_runs.signals_received", [signal.SIGINT])
    print_from_c("after a signal")
    assert capsys.readouterr().err == ""


def handles_sigterm(pid):
    """Whether the process has a SIGTERM handler of its own: the program's first lines install one."""
    caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", open(f"/proc/{pid}/status").read()).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to see the program start")
@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("after", [0, 1, 4], ids=["its first lines", "TensorFlow loading", "the data loading"])
def test_a_signal_at_any_moment_of_the_start_ends_as_an_interruption(sent, status, after, omniglot_npz, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *SMALL_RUN, "--epochs=1",
               f"--checkpoint_dir={tmp_path}"]
    with subprocess.Popen(command, env={**os.environ, "OMNIGLOT_DATA": omniglot_npz}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as run:
        while not handles_sigterm(run.pid):
            time.sleep(0.001)
        time.sleep(after)
        run.send_signal(sent)
        output, errors = run.communicate(timeout=120)
    assert run.returncode == status and "Traceback" not in errors and output == "", errors
    assert errors.splitlines()[-1] in ["learning_to_learn.py: interrupted",
                                       f"learning_to_learn.py: interrupted; no epoch is saved in {tmp_path}"]


def test_running_out_of_memory_in_training_ends_in_one_line():
    with pytest.raises(RunEnded, match="^training ran out of memory: a smaller --batch_size or model needs less; "
                                       "nothing was saved$") as ended:
        with told_what_is_kept(None):
            raise MemoryError
    assert ended.value.status == 1
