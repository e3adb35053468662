"""What long runs of learning_to_learn.py need around the method: flags checked before any work, the memory a
run needs, a checkpoint after every epoch that knows its run, divergence and signals ending the run with one line
that says what is kept, the graded lines and TensorBoard's pictures.

An hour of training is not to be lost or silently wrong: each check here refuses in one line, before the work, a
run that could not end well, and each end of a run says what it leaves on disk.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import zipfile
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

import backends
from omniglot_dataset import ALPHABETS_FILE, DataError, Omniglot, leftovers, not_a_file, unwritable, write_atomically

# Flags

def filter_counts(text):
    """An argparse type: the CNN's filters, integers above 0 separated by commas."""
    counts = text.split(",")
    if not all(count.strip().isdigit() and int(count) > 0 for count in counts):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected integers above 0, one a convolution, "
                                         "as in 8,16,32")
    return [int(count) for count in counts]


class FlagRole(NamedTuple):
    of_the_run: bool  # it shapes what a run computes: a resumed run must have the checkpoint's value
    training_only: bool  # --evaluate refuses it: the model file has its own architecture, nothing is trained
    least: float | None  # the smallest value of a number
    most: float | None  # the largest
    above: float | None  # a bound the number must be above, and finite


FLAGS: dict[str, FlagRole] = {}  # every flag's role, filled as the flags are added; parse_args checks the bounds


def add_flag(group, name, *, of_the_run=True, training_only=True, least=None, most=None, above=None, **options):
    FLAGS[name] = FlagRole(of_the_run, training_only, least, most, above)
    group.add_argument(f"--{name}", **options)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help, with its default where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def defaults(parser):
    """Every flag's default value, as parsed."""
    return vars(parser.parse_args([]))


def checked_flags(parser, argv=None):
    """The flags of `argv` (default: the command line), checked: a bad one ends the program as argparse does."""
    args = parser.parse_args(argv)

    def refuse(flag, reason):
        value = getattr(args, flag)
        parser.error(f"argument --{flag}: invalid value {f'{value:g}' if isinstance(value, float) else value}: "
                     f"{reason}")

    def refuse_path(flag, reason):
        parser.error(f"argument --{flag}: invalid path {getattr(args, flag)!r}: {reason}")

    for flag, role in FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if role.least is not None and value < role.least:
            refuse(flag, f"must be at least {role.least}")
        # A count with no bound of its own is at most 2**31 - 1: TensorFlow's shapes and counts are int32.
        most = role.most if role.most is not None else 2**31 - 1 if type(value) is int else None
        if most is not None and value > most:
            refuse(flag, f"must be at most {most}")
        if role.above is not None and not role.above < value < math.inf:  # nan too
            refuse(flag, f"must be a finite number above {role.above}")

    default = defaults(parser)
    if args.evaluate and (ignored := [f"--{flag}" for flag, role in FLAGS.items()
                                      if role.training_only and getattr(args, flag) != default[flag]]):
        parser.error(f"argument --evaluate: it only evaluates the saved model, so {', '.join(ignored)} "
                     "would be ignored: leave them out")
    convolutions = len(args.cnn_filters)
    if image_side(convolutions, args.cnn_pooling) < 1:
        most = max(layers for layers in range(1, 10) if image_side(layers, args.cnn_pooling) >= 1)
        parser.error(f"argument --cnn_filters: invalid value {','.join(map(str, args.cnn_filters))!r}: "
                     f"{convolutions} convolutions leave no pixel of a {Omniglot.H}x{Omniglot.W} image; at most "
                     f"{most} {'with' if args.cnn_pooling else 'without'} --cnn_pooling")

    if args.save_model and not args.save_model.endswith(".keras"):
        refuse_path("save_model", "expected a name ending in .keras")
    if args.save_model and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_model))):
        refuse_path("save_model", "its folder does not exist")
    if args.evaluate and not os.path.exists(args.evaluate):
        refuse_path("evaluate", "no such file")
    # A folder, a named pipe or a device: reading one waits forever or never ends, replacing one fails at the end.
    for flag, path in [("evaluate", args.evaluate), ("save_model", args.save_model),
                       *[("checkpoint_dir", os.path.join(args.checkpoint_dir, name)) for name in CHECKPOINT_FILES
                         if args.checkpoint_dir]]:
        if path and (kind := not_a_file(path)):
            refuse_path(flag, f"{'its ' + os.path.basename(path) if flag == 'checkpoint_dir' else 'it'} is {kind}, "
                              "not a file")
    for flag in ["checkpoint_dir", "logdir"]:
        folder = getattr(args, flag)
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            refuse_path(flag, "it exists and is not a folder")
    # Tried now, not found out after an hour of training.
    for flag, folder in [("save_model", os.path.dirname(os.path.abspath(args.save_model or "."))),
                         ("checkpoint_dir", args.checkpoint_dir), ("logdir", args.logdir)]:
        if getattr(args, flag) and (problem := unwritable(folder)):
            refuse_path(flag, problem)
    for package in ["tensorflow", "tensorboard", "matplotlib"]:  # the logs and the episode pictures
        if args.logdir and importlib.util.find_spec(package) is None:
            parser.error(f"argument --logdir: needs the {package} package: pip install {package}")

    if args.cnn_bfloat16 and keras.backend.backend() == "tensorflow" and (problem := bfloat16_convolutions_problem()):
        parser.error(f"argument --cnn_bfloat16: {problem}: TensorFlow's own bfloat16 kernels would convolve, slower "
                     "than in float32 and with weight gradients up to a third off; leave it out")
    needs, limits = memory_needed(args), memory_limits()
    total = sum(size for *_, size in needs)
    if limits and total > (left := min(limits))[0]:
        what, flags, size = max(needs, key=lambda need: need[2])
        parser.error(f"argument{'s' * (len(flags) > 1)} {', '.join(f'--{flag}' for flag in flags)}: {what} need "
                     f"about {size / 2**30:.1f} GiB, the run {total / 2**30:.1f} GiB in all, more than the "
                     f"{max(left[0], 0) / 2**30:.1f} GiB left of {left[1]}")
    return args


def cpu_flags():
    """The feature flags of this machine's CPU, as Linux names them in /proc/cpuinfo; None where unknown."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return None


# The instruction sets below which oneDNN has no bfloat16 convolutions, as ONEDNN_MAX_CPU_ISA names them.
ONEDNN_ISAS_WITHOUT_BFLOAT16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI"}


def bfloat16_convolutions_problem():
    """Why --cnn_bfloat16 would be slow and imprecise here, in words; None where it is not.

    TensorFlow hands bfloat16 convolutions to oneDNN, which sums in float32 (storing bfloat16), on a CPU with
    AVX512F or AVX_NE_CONVERT. Elsewhere its own kernels run them, summing in bfloat16: slower than float32 and
    with weight gradients up to a third off (tests/test_model.py compares both with float32 sums).
    """
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false"):
        return "TF_ENABLE_ONEDNN_OPTS turns oneDNN off"
    flags = cpu_flags()
    if flags is not None and not flags & {"avx512f", "avx_ne_convert"}:
        return "this CPU has neither AVX512F nor AVX_NE_CONVERT"
    if (isa := os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()) in ONEDNN_ISAS_WITHOUT_BFLOAT16:
        # TensorFlow asks the CPU, not the cap: oneDNN would then fail on the first convolution.
        return f"ONEDNN_MAX_CPU_ISA={isa} leaves oneDNN no bfloat16 convolutions"
    return None


def image_side(convolutions, pooling):
    """How many pixels a side of the image keeps after the CNN's `convolutions`."""
    side = Omniglot.H
    for _ in range(convolutions):
        side = side // 2 if pooling else (side - 3) // 2 + 1
    return side


def memory_needed(args):
    """About the bytes a run holds at its peak, less TensorFlow's own: `[(what, the flags that size it, bytes)]`.

    A lower bound: a run refused for it could not have run. The episodes count the release's characters.
    """
    steps = args.classes * args.images_per_class
    batch = min(args.batch_size, max(args.train_episodes, args.test_episodes))
    # Training keeps each step's memory, read weights and controller state for the backward pass, 4 bytes a number,
    side, activations = Omniglot.H, 3 * steps * args.cell_size + 3 * args.read_heads * steps + 16 * args.lstm_dim
    for filters in args.cnn_filters:  # and about 4 arrays an image a convolution: its output, normalised, rectified
        side = side if args.cnn_pooling else (side - 3) // 2 + 1  # and its gradient
        activations += 4 * side * side * filters
        side = side // 2 if args.cnn_pooling else side
    # Drawing episodes sorts a random key for each character in each episode, 16 bytes with its rank, and keeps
    # each step's image, labels and move.
    characters = {split: count * (4 if args.rotations and split == "train" else 1)
                  for split, count in Omniglot.CHARACTERS.items()}
    episodes = {split: count * (characters[split] * 16 + steps * 40)
                for split, count in [("train", 0 if args.evaluate else args.train_episodes),
                                     ("test", args.test_episodes)]}
    # The controller's and the convolutions' weights; Adam keeps two more of each, and training a gradient.
    features = args.cnn_filters[-1] * image_side(len(args.cnn_filters), args.cnn_pooling) ** 2
    reads, channels = args.read_heads * args.cell_size, (1, *args.cnn_filters)
    weights = (4 * args.lstm_dim * (features + args.classes + 2 + reads + args.lstm_dim)
               + args.lstm_dim * (reads + args.cell_size) + (args.lstm_dim + reads) * args.lstm_dim
               + sum(9 * before * after for before, after in zip(channels[:-1], channels[1:], strict=True)))
    images = (sum(characters.values())) * 20 * Omniglot.H * Omniglot.W * 4
    return [("the memory states of a batch", ["classes", "images_per_class", "batch_size", "cell_size", "lstm_dim",
                                              "read_heads", "cnn_filters"], 4 * steps * batch * activations),
            ("a training epoch's episodes", ["train_episodes"], episodes["train"]),
            ("the validation episodes", ["test_episodes"], episodes["test"]),
            ("the model's weights", ["lstm_dim", "cell_size", "read_heads", "cnn_filters"], 4 * 4 * weights),
            ("the images", ["rotations"], images)]


CGROUP_ROOT, OWN_CGROUP, OWN_STATUS = "/sys/fs/cgroup", "/proc/self/cgroup", "/proc/self/status"


def memory_limits():
    """`[(bytes left, what limits them)]`: the machine's RAM and the cgroup's limit less what this process holds,
    the address space limit (`ulimit -v`) less what it maps. Empty where none is known."""
    status = {}
    with contextlib.suppress(OSError), open(OWN_STATUS) as lines:
        status = dict(line.split(":", 1) for line in lines if ":" in line)
    resident, mapped = (int(status.get(key, "0 kB").split()[0]) * 1024 for key in ["VmRSS", "VmSize"])
    limits = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - resident, "this machine's RAM"))
    if cgroup := cgroup_memory_limit():
        limits.append((cgroup[0] - resident, f"the cgroup's memory limit ({cgroup[1]})"))
    with contextlib.suppress(ImportError):  # Windows has no resource module
        import resource

        address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
        if address_space != resource.RLIM_INFINITY:
            limits.append((address_space - mapped, "the address space limit RLIMIT_AS (ulimit -v)"))
    return limits


def cgroup_memory_limit():
    """This process's cgroup memory limit and the file that sets it, `(bytes, path)`, or None: cgroup v2's
    memory.max, v1's memory.limit_in_bytes (whose "no limit" is near 2**63)."""
    with contextlib.suppress(OSError), open(OWN_CGROUP) as lines:
        for line in lines.read().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":
                paths = [f"{CGROUP_ROOT}{group}/memory.max", f"{CGROUP_ROOT}/memory.max"]
            elif "memory" in controllers.split(","):
                paths = [f"{CGROUP_ROOT}/memory{group}/memory.limit_in_bytes",
                         f"{CGROUP_ROOT}/memory/memory.limit_in_bytes"]
            else:
                continue
            for path in paths:
                with contextlib.suppress(OSError, ValueError), open(path) as file:
                    limit = file.read().strip()
                    if limit != "max" and int(limit) < 2**62:
                        return int(limit), os.path.normpath(path)
    return None


def check_episodes_fit(parser, args, omniglot):
    """Refuses, as argparse does, episodes that a split cannot fill."""
    for split in ["train", "test"]:
        labels = getattr(omniglot, split).data["labels"]
        characters, drawings = np.unique(labels, return_counts=True)
        if args.classes > len(characters):
            parser.error(f"argument --classes: invalid value {args.classes}: "
                         f"the {split} split has only {len(characters)} characters")
        if args.images_per_class > drawings.min():
            parser.error(f"argument --images_per_class: invalid value {args.images_per_class}: "
                         f"some characters of the {split} split have only {drawings.min()} drawings")
    if args.within_alphabet:
        if omniglot.train.alphabets is None:
            raise DataError(f"--within_alphabet needs each character's alphabet, and {omniglot.path} names none: "
                            f"put a {ALPHABETS_FILE} of the columns split, label and alphabet beside it, or remove "
                            "it and unset OMNIGLOT_DATA: the next run downloads the data set, which names them")
        largest = np.unique(omniglot.train.alphabets, return_counts=True)[1].max()
        if args.classes > largest:
            parser.error(f"argument --classes: invalid value {args.classes}: with --within_alphabet at most "
                         f"{largest}, the characters of the train split's largest alphabet")


class RunEnded(Exception):
    """Training ended before its end: a write failed, the loss diverged, or the user interrupted it."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


signals_received = []  # TensorFlow turns an exception raised inside its own calls into another: remember the cause


def interrupt(signal_number, frame):
    signals_received.append(signal_number)
    raise Terminated if signal_number == signal.SIGTERM else KeyboardInterrupt


def raise_swallowed_interruption():
    """Raises the interruption a signal began where TensorFlow caught it on the way: in a thread of tf.data's it
    ends fit's or evaluate's epoch early, as if the episodes ran out."""
    if signals_received:
        raise Terminated if signals_received[-1] == signal.SIGTERM else KeyboardInterrupt


def print_unless_interrupted(kind, error, traceback):
    """`sys.excepthook`, which C code calls to print an exception it caught: after a signal that is the
    interruption in another form (TensorFlow printed a SystemError so), and the program's last line says it."""
    if not signals_received:
        sys.__excepthook__(kind, error, traceback)


def leave(status, message):
    """Ends the program with one line on stderr, at once: a run that ends early leaves TensorFlow's threads still
    feeding batches, and the interpreter's usual exit tears down what they use under them (a segmentation fault,
    now and then, instead of the status)."""
    sys.stdout.flush()
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr, flush=True)
    os._exit(status)


def interruption_status(error):
    """130 or 143 where `error` is an interruption, or the form TensorFlow gave one; None where it is not."""
    if isinstance(error, KeyboardInterrupt):
        return 143 if isinstance(error, Terminated) else 130
    if signals_received and isinstance(error, Exception):
        return 143 if signals_received[-1] == signal.SIGTERM else 130
    return None


def ending_in_one_line(run):
    """Calls `run` and ends the program: an error of data or flags, a run ended early, or an interruption in one
    line on stderr, and the exit status that says which (2; RunEnded's; 130 or 143)."""
    signal.signal(signal.SIGINT, interrupt)  # from here on an interruption is an exception
    signal.signal(signal.SIGTERM, interrupt)
    sys.excepthook = print_unless_interrupted
    try:
        run()
        raise_swallowed_interruption()  # --evaluate's too
    except DataError as error:
        leave(2, f"error: {error}")
    except RunEnded as ended:
        leave(ended.status, ended)
    except BaseException as error:
        if (status := interruption_status(error)) is None:
            raise
        leave(status, "interrupted")


class StopOnDivergence(keras.callbacks.Callback):
    """Ends training at the first batch whose loss is not finite or above -ln(epsilon) = 16.1, the loss of
    answering every step with certainty and wrongly: such a model will not come back.

    `keras.callbacks.TerminateOnNaN` catches NaN and infinity only, and a loss computed from the softmax's
    logits, as Keras does, diverges to large finite values too (1e10 at --learning_rate=1e9).
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not loss <= -math.log(keras.config.epsilon()):
            raise RunEnded(f"training diverged in epoch {self.epoch + 1}: the loss was {loss:.4g} after batch "
                           f"{batch + 1}; a smaller --learning_rate is the likely cure")


def run_flags(args):
    """The flags that make a run what it is: those of its model, its episodes and its training."""
    return {flag: getattr(args, flag) for flag, role in FLAGS.items() if role.of_the_run}


def differing_flags(saved, current, default):
    """The flags in which two runs differ, in words."""
    def text(value):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    # A flag newer than the checkpoint had its default value there.
    saved = {flag: saved.get(flag, default[flag]) for flag in current}
    # Without a decaying learning rate, nothing depends on --epochs: more epochs continue the same run.
    ignored = ["epochs"] if saved["learning_rate_decay"] == current["learning_rate_decay"] == "none" else []
    return [f"--{flag} {text(saved[flag])} in the checkpoint, {text(value)} now"
            for flag, value in current.items() if flag not in ignored and saved[flag] != value]


CHECKPOINT_FILES = ["checkpoint.npz", "lock"]  # what a checkpoint folder holds


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, saves the weights, the optimizer state, the run's flags, the number of epochs done
    and the Keras backend that trained them into one npz file, replaced atomically: a kill leaves the last
    epoch's file or the one before.

    `keras.callbacks.BackupAndRestore` keeps the epoch in a second file, which a kill can tear from the
    weights, and knows no flags. The file is written by numpy rather than h5py, which can crash the
    process when the disk fills. A lock, held while the run trains, keeps a second run out of the folder.
    Another backend's optimizer steps differ in their last bits: such a run resumes only on its own backend.

    `run`: the run's flags (`run_flags`); `default`: every flag's default, for the flags newer than a checkpoint.
    """

    def __init__(self, directory, run, default):
        super().__init__()
        self.directory, self.run, self.defaults, self.saved = directory, run, default, None
        self.path, self.lock_path = (os.path.join(directory, name) for name in CHECKPOINT_FILES)

    def claim(self):
        """Locks the folder for this process, checks that a checkpoint in it is one of this run, and removes what
        killed writes left; returns itself."""
        os.makedirs(self.directory, exist_ok=True)
        for path in [self.path, self.lock_path]:  # as parse_args does: either may have changed since
            if kind := not_a_file(path):
                raise DataError(f"{path} is {kind}, not a file: choose another --checkpoint_dir")
        self.lock = open(self.lock_path, "w")  # the kernel releases it when we die
        try:
            with contextlib.suppress(ImportError):  # Windows has no fcntl: its folders go unlocked
                import fcntl

                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another run is training into {self.directory}: let it finish, "
                            "or choose another --checkpoint_dir") from None
        if os.path.exists(self.path):
            try:
                self.saved = self.read()
            except Exception as error:
                raise self.refusal(error) from None
            if (trained_on := self.saved[3]) != keras.backend.backend():
                raise DataError(f"{self.directory} holds a run trained on Keras's {trained_on} backend: resume it "
                                f"there (KERAS_BACKEND={trained_on}), or choose another --checkpoint_dir to start anew")
            if differences := differing_flags(self.saved[0], self.run, self.defaults):
                raise DataError(f"{self.directory} holds a run of other flags ({'; '.join(differences)}): run its "
                                "original command to continue it, or choose another --checkpoint_dir to start anew")
        for leftover in leftovers(self.path):
            os.remove(leftover)
        return self

    def refusal(self, reason):
        return DataError(f"cannot read the checkpoint {self.path} ({reason}); "
                         "choose another --checkpoint_dir to start anew")

    def read(self):
        """`(run, epochs, arrays, backend)` of the checkpoint file, each held to what `on_epoch_end` writes: a
        ValueError says what differs. The arrays' shapes are the model's to check, in `restore`."""
        if not zipfile.is_zipfile(self.path):
            raise ValueError("not an npz file")
        with np.load(self.path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        # A checkpoint that names no backend was written before there was a choice: on TensorFlow.
        backend = arrays.pop("backend", np.array("tensorflow"))
        count = len(set(arrays) - {"run", "epochs"})
        if set(arrays) != {"run", "epochs", *[f"variable_{index}" for index in range(count)]}:
            raise ValueError(f"it holds {', '.join(sorted(arrays))}; expected run, epochs, backend and variable_0 "
                             "onwards")
        if backend.shape or backend.dtype.kind != "U":
            raise ValueError("its backend is not a name")
        run, epochs = arrays.pop("run"), arrays.pop("epochs")
        if run.shape or run.dtype.kind != "U" or not isinstance(run := json.loads(str(run)), dict):
            raise ValueError("its run is not a JSON object of flags")
        for flag, value in run.items():
            expected = self.run.get(flag)
            if type(value) is bool and type(expected) is float:  # an earlier version's switch, now a share
                run[flag] = value = float(value)
            if flag in self.run and not (type(value) is type(expected) and (
                    not isinstance(value, list) or all(type(item) is int for item in value))):
                raise ValueError(f"its run's --{flag} is {value!r}, not of the type of {expected!r}")
        most = run.get("epochs", self.defaults["epochs"])
        if epochs.shape or epochs.dtype.kind not in "iu" or not 0 <= int(epochs) <= most:
            raise ValueError(f"its epochs are {epochs.tolist()!r}; expected a whole number from 0 to {most}")
        if strange := [name for name, array in arrays.items() if array.dtype.kind not in "fiu"]:
            raise ValueError(f"{', '.join(strange)} hold no numbers")
        return run, int(epochs), [arrays[f"variable_{index}"] for index in range(count)], str(backend)

    @staticmethod
    def variables(model):
        """What a checkpoint holds, in the order it is saved and restored: every weight, then Adam's state."""
        return model.weights + model.optimizer.variables

    def restore(self, model):
        """Loads the claimed checkpoint, if any, into `model`; returns the number of epochs it has done."""
        if self.saved is None:
            return 0
        _, epochs, arrays, _ = self.saved
        model.optimizer.build(model.trainable_variables)
        variables = self.variables(model)
        if len(arrays) != len(variables):
            raise self.refusal(f"it holds {len(arrays)} arrays of weights and optimizer state, this model "
                               f"{len(variables)}")
        for index, (array, variable) in enumerate(zip(arrays, variables, strict=True)):
            if array.shape != tuple(variable.shape) or array.dtype != variable.dtype:
                raise self.refusal(f"its variable_{index} is {array.dtype} {array.shape}, this model's "
                                   f"{variable.dtype} {tuple(variable.shape)}")
        if not all(np.isfinite(array).all() for array in arrays):
            raise self.refusal("it holds numbers that are not finite: it is damaged")
        for variable, array in zip(variables, arrays, strict=True):
            variable.assign(array)
        if epochs >= self.run["epochs"]:
            print(f"{epochs} epochs are done in {self.directory}: nothing to train.", file=sys.stderr)
        return epochs

    def on_epoch_end(self, epoch, logs=None):
        arrays = {f"variable_{index}": ops.convert_to_numpy(variable)
                  for index, variable in enumerate(self.variables(self.model))}
        try:
            write_atomically(self.path, lambda path: np.savez(path, run=json.dumps(self.run), epochs=epoch + 1,
                                                              backend=keras.backend.backend(), **arrays),
                             suffix=".npz")
        except OSError as error:
            raise RunEnded(f"cannot write the checkpoint {self.path} ({error.strerror})") from None

    def epochs_on_disk(self):
        """The epochs done that the checkpoint file holds now, read back: 0 where none is there to resume."""
        if not_a_file(self.path):
            return 0
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                return int(saved["epochs"])
        except Exception:  # gone, or not what a run wrote
            return 0

    def kept(self):
        """What a run that ends now leaves on disk for the next one, in words."""
        if epochs := self.epochs_on_disk():
            return f"{self.path} keeps epoch {epochs}: run the same command to resume"
        return f"no epoch is saved in {self.directory}"


@contextlib.contextmanager
def told_what_is_kept(checkpoint, model_path=None):
    """Turns an early end of training (an interruption, a RunEnded) into a RunEnded that says what is on disk at
    that moment, read back: the epochs the checkpoint holds, and the model if this run wrote it."""
    started = time.time()

    def kept():
        words = [checkpoint.kept() if checkpoint else "nothing was saved"]
        if model_path and not not_a_file(model_path) and os.path.exists(model_path) \
                and os.path.getmtime(model_path) >= started:
            words = [f"the trained model is in {model_path}"] + (words if checkpoint else [])
        return "; ".join(words)

    try:
        yield
        raise_swallowed_interruption()
    except RunEnded as ended:
        raise RunEnded(f"{ended}; {kept()}", ended.status) from None
    except backends.out_of_memory_errors():  # more than memory_needed's lower bound
        raise RunEnded(f"training ran out of memory: a smaller --batch_size or model needs less; {kept()}") from None
    except BaseException as error:
        if (status := interruption_status(error)) is None:
            raise
        if checkpoint and (epochs := checkpoint.epochs_on_disk()):
            raise RunEnded(f"interrupted after epoch {epochs}; run the same command to resume", status) from None
        raise RunEnded(f"interrupted; {kept()}", status) from None


def save_uncompiled(model, path):
    """Writes `model` to `path` atomically, without its optimizer: Adam's state is twice the weights' size,
    resuming a run is the checkpoint's job, and `load_trained_model` compiles what it loads."""
    uncompiled = keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers and weights
    try:
        write_atomically(path, uncompiled.save, suffix=".keras")
    except OSError as error:
        raise RunEnded(f"cannot write the model {path} ({error.strerror})") from None


# The graded lines
#
# `--recodex` prints one line of every metric an epoch, in the order a grader compares; `--evaluate` one
# line of the same.

def metrics_line(logs, names):
    return " - ".join(f"{name}: {logs[name]:.4f}" for name in names)


class GradedEpochLine(keras.callbacks.Callback):
    """Prints `Epoch 1/3 loss: ... - val_acc10: ...`, the metrics in a fixed order (Keras sorts its own)."""

    def __init__(self, epochs, names):
        super().__init__()
        self.epochs, self.names = epochs, names + [f"val_{name}" for name in names]

    def on_epoch_end(self, epoch, logs=None):
        print(f"Epoch {epoch + 1}/{self.epochs} {metrics_line(logs, self.names)}", flush=True)


# TensorBoard's pictures

def episode_figure(images, labels, guesses):
    """A matplotlib figure of one episode: every image in order, and under it the how-many-th occurrence of its
    class (grey), its label (black) and the model's guess (green, or red with the image framed in red if wrong)."""
    from matplotlib.figure import Figure  # only --logdir needs matplotlib

    figure = Figure(figsize=(0.4 * len(labels), 1.2), dpi=100)
    figure.subplots_adjust(left=0, right=1, top=1, bottom=0.4, wspace=0.1)
    occurrences = [np.sum(labels[:step + 1] == label) for step, label in enumerate(labels)]
    steps = zip(figure.subplots(1, len(labels), squeeze=False)[0], images, labels, guesses, occurrences, strict=True)
    for axes, image, label, guess, occurrence in steps:
        axes.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1)  # dark ink on white paper
        axes.set(xticks=[], yticks=[])
        if guess != label:
            for spine in axes.spines.values():
                spine.set(color="red", linewidth=2)
        for row, (number, colour) in enumerate([(int(occurrence), "grey"), (label, "black"),
                                                (guess, "green" if guess == label else "red")]):
            axes.text(0.5, -0.1 - 0.3 * row, str(number), color=colour, fontsize=8, ha="center", va="top",
                      transform=axes.transAxes)
    return figure


def figure_pixels(figure):
    """The RGB pixels of a matplotlib figure: `[height, width, 3]` uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


class EpisodePictures(keras.callbacks.Callback):
    """After every epoch, writes pictures of the first `count` episodes of a validation batch to TensorBoard."""

    def __init__(self, logdir, batch, count=3):
        super().__init__()
        (images, previous), labels = keras.tree.map_structure(np.asarray, batch)
        self.inputs, self.labels = (images[:count], previous[:count]), labels[:count]
        import tensorflow as tf  # Keras's TensorBoard writes through TensorFlow's summaries, whatever the backend

        self.summary = tf.summary
        self.writer = tf.summary.create_file_writer(os.path.join(logdir, "episodes"))

    def on_epoch_end(self, epoch, logs=None):
        predictions = self.model.predict(self.inputs, verbose=0)
        episodes = zip(self.inputs[0], self.labels, np.argmax(predictions, axis=-1), strict=True)
        pictures = np.stack([figure_pixels(episode_figure(*episode)) for episode in episodes])
        with self.writer.as_default():
            self.summary.image("validation episodes", pictures, step=epoch, max_outputs=len(pictures))
        self.writer.flush()


