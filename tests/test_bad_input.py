"""Bad flags and bad data files end with exit status 2 and one clear message, before any work starts.

The README's table "Bad input" lists every case tried here and the program's answer.
"""
import collections
import os
import re
import resource
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import learning_to_learn
import long_runs
from conftest import ROOT, run_program, tensorflow_only
from learning_to_learn import load_trained_model, model_for_training, parse_args
from omniglot_dataset import DataError, Omniglot


@pytest.mark.parametrize("flag, message", [
    ("--classes=1", "argument --classes: invalid value 1: must be at least 2"),
    ("--classes=five", "argument --classes: invalid int value: 'five'"),
    ("--images_per_class=0", "argument --images_per_class: invalid value 0: must be at least 1"),
    ("--batch_size=0", "argument --batch_size: invalid value 0: must be at least 1"),
    ("--cell_size=0", "argument --cell_size: invalid value 0: must be at least 1"),
    ("--lstm_dim=-3", "argument --lstm_dim: invalid value -3: must be at least 1"),
    ("--epochs=0", "argument --epochs: invalid value 0: must be at least 1"),
    ("--train_episodes=0", "argument --train_episodes: invalid value 0: must be at least 1"),
    ("--test_episodes=1.5", "argument --test_episodes: invalid int value: '1.5'"),
    ("--test_episodes=0", "argument --test_episodes: invalid value 0: must be at least 1"),
    ("--read_heads=-1", "argument --read_heads: invalid value -1: must be at least 0"),
    ("--read_sharpness=0", "argument --read_sharpness: invalid value 0: must be a finite number above 0"),
    ("--read_sharpness=inf", "argument --read_sharpness: invalid value inf: must be a finite number above 0"),
    ("--read_sharpness=sharp", "argument --read_sharpness: invalid float value: 'sharp'"),
    ("--read_sharpness=nan", "argument --read_sharpness: invalid value nan: must be a finite number above 0"),
    ("--cnn_filters=8,,32",
     "argument --cnn_filters: invalid value '8,,32': expected integers above 0, one a convolution, as in 8,16,32"),
    ("--cnn_filters=8,x,32",
     "argument --cnn_filters: invalid value '8,x,32': expected integers above 0, one a convolution, as in 8,16,32"),
    ("--cnn_filters=0,16,32",
     "argument --cnn_filters: invalid value '0,16,32': expected integers above 0, one a convolution, as in 8,16,32"),
    ("--cnn_filters=8,16,32,64", "argument --cnn_filters: invalid value '8,16,32,64': 4 convolutions leave no pixel "
     "of a 28x28 image; at most 3 without --cnn_pooling"),
    ("--cnn_pooling --cnn_filters=8,8,8,8,8", "argument --cnn_filters: invalid value '8,8,8,8,8': 5 convolutions "
     "leave no pixel of a 28x28 image; at most 4 with --cnn_pooling"),
    ("--learning_rate=0", "argument --learning_rate: invalid value 0: must be a finite number above 0"),
    ("--learning_rate=-1e-3", "argument --learning_rate: invalid value -0.001: must be a finite number above 0"),
    ("--first_occurrence_weight=-2",
     "argument --first_occurrence_weight: invalid value -2: must be a finite number above 0"),
    ("--shift=-1", "argument --shift: invalid value -1: must be at least 0"),
    ("--within_alphabet=1.5", "argument --within_alphabet: invalid value 1.5: must be at most 1"),
    ("--threads=-1", "argument --threads: invalid value -1: must be at least 0"),
    ("--seed=x", "argument --seed: invalid int value: 'x'"),
    ("--seed=-1", "argument --seed: invalid value -1: must be at least 0"),
    ("--seed=4294967296", "argument --seed: invalid value 4294967296: must be at most 4294967295"),
    ("--save_model=model.h5", "argument --save_model: invalid path 'model.h5': expected a name ending in .keras"),
    ("--save_model=no/such/folder/m.keras",
     "argument --save_model: invalid path 'no/such/folder/m.keras': its folder does not exist"),
    ("--evaluate=no_such_model.keras", "argument --evaluate: invalid path 'no_such_model.keras': no such file"),
    ("--checkpoint_dir=README.md",
     "argument --checkpoint_dir: invalid path 'README.md': it exists and is not a folder"),
    ("--logdir=README.md", "argument --logdir: invalid path 'README.md': it exists and is not a folder"),
])
def test_bad_flag_is_refused_by_the_parser(flag, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit:
        parse_args(flag.split())
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"{os.path.basename(sys.argv[0])}: error: {message}"


@pytest.mark.parametrize("flags, environment, refusal", [
    ({"avx", "avx2", "fma"}, {}, "this CPU has neither AVX512F nor AVX_NE_CONVERT"),
    ({"avx2", "avx512f"}, {"ONEDNN_MAX_CPU_ISA": "avx2"}, "ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN no bfloat16 "
                                                            "convolutions"),
    ({"avx2", "avx512f"}, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "TF_ENABLE_ONEDNN_OPTS turns oneDNN off"),
    ({"avx2", "avx512f"}, {}, None), ({"avx2", "avx512f", "avx512_bf16"}, {}, None),
    ({"avx2", "avx_ne_convert"}, {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"}, None),
])
@tensorflow_only
def test_cnn_bfloat16_is_refused_where_tensorflows_own_kernels_would_sum_in_bfloat16(flags, environment, refusal,
                                                                                      capsys, monkeypatch):
    # Whatever this machine's CPU: each kind of CPU and setting, as the program reads it.
    monkeypatch.setattr(long_runs, "cpu_flags", lambda: flags)
    for name in ["ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if refusal is None:
        assert parse_args(["--cnn_bfloat16"]).cnn_bfloat16
        return
    with pytest.raises(SystemExit) as exit:
        parse_args(["--cnn_bfloat16"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{os.path.basename(sys.argv[0])}: error: argument --cnn_bfloat16: {refusal}: TensorFlow's own bfloat16 "
        "kernels would convolve, slower than in float32 and with weight gradients up to a third off; leave it out")


def assert_refused(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    # Above the message stand only TensorFlow's own start-up notices, which it prints before any flag is read.
    assert result.stderr.splitlines()[-1] == f"learning_to_learn.py: error: {message}"


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("--classes=660", "argument --classes: invalid value 660: the test split has only 659 characters"),
    ("--images_per_class=21",
     "argument --images_per_class: invalid value 21: some characters of the train split have only 20 drawings"),
])
def test_episodes_a_split_cannot_fill_are_refused_before_training(flag, message, omniglot_npz, tmp_path):
    # Small batches of one drawing a class: memory states that any machine holds.
    result = run_program(flag, "--images_per_class=1" if "classes" in flag else "--classes=2", "--batch_size=1",
                         "--save_model=model.keras", "--checkpoint_dir=checkpoints",
                         data=omniglot_npz, cwd=tmp_path)
    assert_refused(result, message)
    assert os.listdir(tmp_path) == [], "a refused run wrote files"


@pytest.mark.slow
def test_a_file_that_is_no_model_is_refused_by_evaluate(omniglot_npz, tmp_path):
    (tmp_path / "notes.keras").write_text("not a model")
    result = run_program("--evaluate=notes.keras", data=omniglot_npz, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "learning_to_learn.py: error: notes.keras is not a model saved by this program")


def npz_with(path, omniglot_npz, **changes):
    arrays = dict(np.load(omniglot_npz))
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def written(path, content):
    path.write_bytes(content)
    return path


BAD_FILES = {
    "missing": lambda path, npz: path,
    "empty": lambda path, npz: written(path, b""),
    "not an npz": lambda path, npz: written(path, b"train_images,train_labels\n"),
    "truncated": lambda path, npz: written(path, open(npz, "rb").read()[:100_000]),
    "missing keys": lambda path, npz: npz_with(path, npz, test_labels=None),
    "images of the wrong shape": lambda path, npz: npz_with(path, npz, train_images=np.zeros([4, 28, 28], np.uint8),
                                                           train_labels=np.zeros([4], np.int32)),
    "images of the wrong type": lambda path, npz: npz_with(path, npz, test_images=np.zeros([4, 28, 28, 1]),
                                                          test_labels=np.zeros([4], np.int32)),
    "labels not matching the images": lambda path, npz: npz_with(path, npz, train_labels=np.zeros([7], np.int32)),
    # int32 would wrap 2**31 onto -2**31; negative labels would make rotated characters collide.
    "labels too large for int32": lambda path, npz: npz_with(path, npz, train_labels=np.arange(19280) + 2**31 - 1),
    "negative labels": lambda path, npz: npz_with(path, npz, test_labels=np.arange(13180) - 1),
    "alphabets not one a character": lambda path, npz: npz_with(path, npz, train_alphabets=np.array(["A"] * 5)),
}
PROBLEMS = {
    "missing": "cannot read", "empty": "cannot read", "not an npz": "cannot read", "truncated": "cannot read",
    "missing keys": "lacks the arrays test_images and test_labels",
    "images of the wrong shape": "train_images is uint8 (4, 28, 28), expected uint8 [N, 28, 28, 1]",
    "images of the wrong type": "test_images is float64 (4, 28, 28, 1), expected uint8 [N, 28, 28, 1]",
    "labels not matching the images": "train_labels is int32 (7,), expected integers, one per image (19280)",
    "labels too large for int32": "train_labels run from 2147483647 to 2147502926, expected labels 0..2147483647",
    "negative labels": "test_labels run from -1 to 13178, expected labels 0..2147483647",
    "alphabets not one a character": "train_alphabets is <U1 (5,), expected 964 names, one a character",
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_omniglot_data_file_names_the_file_and_the_fix(kind, tmp_path, monkeypatch, omniglot_npz):
    path = BAD_FILES[kind](tmp_path / "omniglot.npz", omniglot_npz)
    monkeypatch.setenv("OMNIGLOT_DATA", str(path))
    with pytest.raises(DataError) as error:
        Omniglot()
    assert str(path) in str(error.value) and PROBLEMS[kind] in str(error.value)
    assert "OMNIGLOT_DATA" in str(error.value)


@pytest.mark.parametrize("kind", ["empty", "truncated", "missing keys"])
def test_bad_cache_file_says_to_remove_it(kind, tmp_path, monkeypatch, omniglot_npz):
    cache = tmp_path / "keras" / "datasets"
    cache.mkdir(parents=True)
    path = BAD_FILES[kind](cache / "omniglot.npz", omniglot_npz)
    monkeypatch.delenv("OMNIGLOT_DATA", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(DataError, match="remove it, and the next run downloads the data set again") as error:
        Omniglot()
    assert str(path) in str(error.value)


def test_within_alphabet_needs_the_alphabets_and_one_large_enough(tmp_path, monkeypatch, omniglot_npz, capsys):
    from long_runs import check_episodes_fit

    unnamed = npz_with(tmp_path / "omniglot.npz", omniglot_npz, train_alphabets=None, test_alphabets=None)
    monkeypatch.setenv("OMNIGLOT_DATA", str(unnamed))
    with pytest.raises(DataError, match=rf"^--within_alphabet needs each character's alphabet, and {unnamed} names "
                                        r"none: put a characters.csv .* beside it, or remove it and unset "):
        check_episodes_fit(learning_to_learn.parser, parse_args(["--within_alphabet"]), Omniglot())
    check_episodes_fit(learning_to_learn.parser, parse_args([]), Omniglot())  # without the flag it is no matter
    assert [parse_args(flags).within_alphabet for flags in [[], ["--within_alphabet"], ["--within_alphabet=0.25"]]] \
        == [0, 1, 0.25]

    monkeypatch.setenv("OMNIGLOT_DATA", omniglot_npz)
    omniglot = Omniglot()
    if omniglot.train.alphabets is None:
        pytest.skip(f"{omniglot_npz} names no alphabets")
    largest = max(collections.Counter(omniglot.train.alphabets).values())
    with pytest.raises(SystemExit) as exit:
        check_episodes_fit(learning_to_learn.parser, parse_args([f"--classes={largest + 1}", "--within_alphabet"]),
                           omniglot)
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument --classes: invalid value {largest + 1}: with --within_alphabet at most {largest}, "
        "the characters of the train split's largest alphabet")
    check_episodes_fit(learning_to_learn.parser, parse_args([f"--classes={largest}", "--within_alphabet"]), omniglot)


@pytest.mark.slow
def test_bad_data_file_ends_the_program_with_one_line(tmp_path, omniglot_npz):
    result = run_program("--epochs=1", data=tmp_path / "none.npz", cwd=tmp_path)
    assert_refused(result, f"cannot read {tmp_path / 'none.npz'} as an npz file "
                           f"([Errno 2] No such file or directory: '{tmp_path / 'none.npz'}'); "
                           "point OMNIGLOT_DATA at a good copy, or unset it to use the Keras cache")


def test_evaluate_refuses_a_foreign_model_and_one_of_other_episodes(tmp_path):
    foreign = keras.Sequential([keras.Input([4]), keras.layers.Dense(2)])
    foreign.save(tmp_path / "foreign.keras")
    args = parse_args(["--classes=3", "--images_per_class=2", "--lstm_dim=8", "--cell_size=4"])
    with pytest.raises(DataError, match="foreign.keras is a Keras model but not one of this program"):
        load_trained_model(str(tmp_path / "foreign.keras"), classes=3, images_per_class=2)

    model_for_training(args).save(tmp_path / "three_way.keras")
    with pytest.raises(DataError, match="trained on episodes of --classes=3 --images_per_class=2: evaluate it with"):
        load_trained_model(str(tmp_path / "three_way.keras"), classes=5, images_per_class=2)
    model = load_trained_model(str(tmp_path / "three_way.keras"), classes=3, images_per_class=2)
    assert model.outputs[0].shape[-1] == 3


# Counts no machine can run, refused before any work.

@pytest.mark.parametrize("flag, message", [
    ("--epochs=100000000000000000000", "argument --epochs: invalid value 100000000000000000000: must be at most "
                                       "2147483647"),
    ("--train_episodes=1000000000000", "argument --train_episodes: invalid value 1000000000000: must be at most "
                                       "2147483647"),
    ("--shift=28", "argument --shift: invalid value 28: must be at most 27"),
    ("--threads=4294967296", "argument --threads: invalid value 4294967296: must be at most 2147483647"),
    # Drawing an episode sorts a key of 8 bytes and its rank for each character, and keeps 40 bytes a step:
    # 10**9 * (659 * 16 + 50 * 40) bytes for the evaluation alphabets' 659 characters, (964 * 16 + 50 * 40) for
    # the background's 964.
    ("--test_episodes=1000000000", "argument --test_episodes: the validation episodes need about 11682.5 GiB"),
    ("--train_episodes=1000000000", "argument --train_episodes: a training epoch's episodes need about 16227.4 GiB"),
    ("--lstm_dim=1000000", "arguments --lstm_dim, --cell_size, --read_heads, --cnn_filters: the model's weights "
                           "need about"),
    # 4 bytes * 50 steps * 16 episodes * (3 * 50 cells * 100000 units + 3 * 50 read weights + 16 * 256 of the LSTM
    # + 4 * (13 * 13 * 8 + 6 * 6 * 16 + 2 * 2 * 32) of the CNN)
    ("--cell_size=100000", "arguments --classes, --images_per_class, --batch_size, --cell_size, --lstm_dim, "
                           "--read_heads, --cnn_filters: the memory states of a batch need about 44.7 GiB"),
    # 16 bytes (a weight, its gradient, Adam's two) * (9 * (8 + 8 * 8 + 8 * 1000 + 1000 * 100000) of the
    # convolutions + 4 * 256 * (100000 + 5 + 2 + 40 + 256) + 256 * 80 + 296 * 256 of the controller)
    ("--cnn_pooling --cnn_filters=8,8,1000,100000", "arguments --lstm_dim, --cell_size, --read_heads, "
                                                    "--cnn_filters: the model's weights need about 14.9 GiB"),
])
def test_a_count_no_machine_can_run_is_refused_naming_its_flag(flag, message, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(flag.split())
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"{os.path.basename(sys.argv[0])}: error: {message}")


# The memory a run may use: the smallest of the RAM, the cgroup's limit and the address space limit.

# --cell_size=40000: the memory states of a batch alone take 4 * 50 * 16 * (3 * 50 * 40000 + 150 + 4096) bytes,
# 17.9 GiB: under the RAM of a machine of 24 GiB, over a limit of 16 GiB.
LARGE = ["--cell_size=40000"]


@pytest.mark.parametrize("version, file, controllers", [("v2", "memory.max", ""),
                                                       ("v1", "memory/limit/memory.limit_in_bytes", "memory")])
def test_a_cgroups_memory_limit_below_the_machines_is_the_one_a_run_is_held_to(version, file, controllers, tmp_path,
                                                                              monkeypatch, capsys):
    import long_runs

    needed = sum(size for *_, size in long_runs.memory_needed(learning_to_learn.parser.parse_args(LARGE)))
    if needed > min(limit for limit, _ in long_runs.memory_limits()):
        pytest.skip("this machine has less memory than the run needs: its own limit refuses it first")
    (tmp_path / "cgroup").write_text(f"4:{controllers}:{'/limit' if version == 'v1' else ''}\n")
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(f"{16 * 2**30}\n")
    monkeypatch.setattr(long_runs, "OWN_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(long_runs, "CGROUP_ROOT", str(tmp_path))
    with pytest.raises(SystemExit):
        parse_args(LARGE)
    assert re.search(rf"the run \d+\.\d GiB in all, more than the \d+\.\d GiB left of the cgroup's memory limit "
                     rf"\({tmp_path / file}\)$", capsys.readouterr().err)
    (tmp_path / file).write_text("max\n" if version == "v2" else "9223372036854771712\n")  # no limit
    assert parse_args(["--cell_size=100"]).cell_size == 100


def test_memory_left_is_each_limit_less_what_the_process_holds_or_maps_against_it(tmp_path, monkeypatch):
    # RAM and a cgroup's limit bound what the process holds (VmRSS), the address space limit what it maps (VmSize).
    import resource

    import long_runs

    (tmp_path / "status").write_text("Name:\tpython3\nVmSize:\t 5000000 kB\nVmRSS:\t    1000 kB\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "memory.max").write_text(f"{16 * 2**30}\n")
    monkeypatch.setattr(long_runs, "OWN_STATUS", str(tmp_path / "status"))
    monkeypatch.setattr(long_runs, "OWN_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(long_runs, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 6 * 2**20}.get)  # 24 GiB
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (20 * 2**30, resource.RLIM_INFINITY))
    assert long_runs.memory_limits() == [
        (24 * 2**30 - 1000 * 1024, "this machine's RAM"),
        (16 * 2**30 - 1000 * 1024, f"the cgroup's memory limit ({tmp_path / 'memory.max'})"),
        (20 * 2**30 - 5000000 * 1024, "the address space limit RLIMIT_AS (ulimit -v)")]


@pytest.mark.slow  # a process of its own, to set the limit in
def test_an_address_space_limit_set_in_a_child_is_the_one_a_run_is_held_to():
    child = subprocess.run([sys.executable, "-c", f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, resource.RLIM_INFINITY))
sys.path.insert(0, {ROOT!r})
import learning_to_learn
learning_to_learn.parse_args({LARGE!r})
"""], capture_output=True, text=True, timeout=120)
    assert child.returncode == 2 and "Traceback" not in child.stderr, child.stderr
    assert child.stderr.splitlines()[-1].endswith("GiB left of the address space limit RLIMIT_AS (ulimit -v)")


# Only regular files are read or replaced: a named pipe would be waited on for ever.

def test_a_named_pipe_or_a_folder_as_a_file_is_refused_at_once(tmp_path, monkeypatch, capsys):
    os.mkfifo(tmp_path / "pipe")
    signal.alarm(60)  # a read of the pipe would never return: fail instead
    try:
        monkeypatch.setenv("OMNIGLOT_DATA", str(tmp_path / "pipe"))
        with pytest.raises(DataError, match=f"^cannot read {tmp_path}/pipe: it is a named pipe, not a file; point "
                                            "OMNIGLOT_DATA at a good copy"):
            Omniglot()
        with pytest.raises(SystemExit):
            parse_args([f"--evaluate={tmp_path / 'pipe'}"])
        assert capsys.readouterr().err.endswith(f"invalid path '{tmp_path / 'pipe'}': it is a named pipe, not a "
                                                "file\n")
    finally:
        signal.alarm(0)
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(SystemExit):
        parse_args([f"--save_model={tmp_path / 'folder.keras'}"])
    assert capsys.readouterr().err.endswith(f"invalid path '{tmp_path / 'folder.keras'}': it is a folder, not a "
                                            "file\n")


@tensorflow_only  # under such a limit JAX's import spins in C, and PyTorch's aborts: neither says why in Python
def test_no_room_to_load_tensorflow_ends_in_one_line():
    def little_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, resource.RLIM_INFINITY))

    result = subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py")], capture_output=True,
                            text=True, timeout=120, preexec_fn=little_address_space)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("learning_to_learn.py: error: cannot load Keras and its backend (")
