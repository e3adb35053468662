#!/usr/bin/env python3
"""Measures training speed: steady-state episodes/s, time to the end of the first epoch, whole run, peak memory.

Each configuration runs in a fresh process (its own threads, its own peak memory), on the Keras backend that
KERAS_BACKEND names, or on each that `--backends` names:

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/speed.py --backends tensorflow jax torch --plain

prints a Markdown table for the README. Steady-state speed counts training alone
(validation excluded), median over the epochs after the first; "with
validation" divides by whole epochs instead. `--plain` adds
the straightforward Keras build of the same model beside each: `keras.layers.RNN`
over the cell, automatic differentiation, a Python generator of episodes.
`--profile FLAGS` (TensorFlow) splits one training batch of the program's run of FLAGS
(quoted, as one argument) into its parts instead, in ms.
"""
import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

bench = argparse.ArgumentParser(description=__doc__.splitlines()[0])
bench.add_argument("--classes", default=[5, 2], type=int, nargs="+", help="Episode widths to measure.")
bench.add_argument("--train_episodes", default=3200, type=int, help="Training episodes per epoch.")
bench.add_argument("--test_episodes", default=320, type=int, help="Validation episodes.")
bench.add_argument("--epochs", default=3, type=int, help="Epochs; the first one includes tracing and compiling.")
bench.add_argument("--flags", default="", help="More flags of the program for every run, quoted as one argument.")
bench.add_argument("--plain", action="store_true", help="Measure the straightforward Keras build beside each.")
bench.add_argument("--backends", default=[os.environ.get("KERAS_BACKEND", "tensorflow")], nargs="+",
                   choices=["tensorflow", "jax", "torch"], help="The Keras backends to measure, one after another.")
bench.add_argument("--profile", default=None, metavar="FLAGS", help="Where a batch's time goes in the run of FLAGS.")
bench.add_argument("--child", default=None, help=argparse.SUPPRESS)


def cpu(info=None):
    """The CPU's model name, its widest vector instructions and its bfloat16 units, from `info` (default:
    /proc/cpuinfo, where there is one): a run's speed depends on all three (`--cnn_bfloat16` on the last)."""
    try:
        if info is None:
            with open("/proc/cpuinfo") as file:
                info = file.read()
    except OSError:
        return platform.processor()
    model = re.search(r"^model name\s*: (.*)$", info, re.MULTILINE)
    flags = set(re.search(r"^flags\s*: (.*)$", info, re.MULTILINE).group(1).split())
    widest = next((name for flag, name in [("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")]
                   if flag in flags), "no AVX")
    bfloat16 = next((f", {name}" for flag, name in [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16")]
                     if flag in flags), "")
    return f"{model.group(1) if model else platform.processor()}, {widest}{bfloat16}"


def epoch_clock():
    """A callback that keeps the time each epoch's training took (validation excluded) and when each epoch ended."""
    import keras

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_ends, self.training_seconds = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_test_begin(self, logs=None):  # validation follows the epoch's training
            self.training_seconds.append(time.perf_counter() - self.epoch_start)

        def on_epoch_end(self, epoch, logs=None):
            if len(self.training_seconds) <= epoch:  # no validation this epoch
                self.training_seconds.append(time.perf_counter() - self.epoch_start)
            self.epoch_ends.append(time.perf_counter() - START)

    return Clock()


def call_seconds(function, *arguments):
    """The seconds of one call of `function`, its results fetched: TensorFlow may return before computing them."""
    import tensorflow as tf

    start = time.perf_counter()
    tf.nest.map_structure(lambda tensor: tensor.numpy(), function(*arguments))
    return time.perf_counter() - start


def training_pass(layer, output_gradient, wrt_inputs):
    """A `tf.function` of `layer`'s inputs: its forward pass in training, then the gradients of its weights (and,
    with `wrt_inputs`, of its inputs) from `output_gradient`, that of its output."""
    import tensorflow as tf

    @tf.function
    def both(*arguments):
        with tf.GradientTape() as tape:
            tape.watch(arguments)
            result = layer(*arguments, training=True)
        sources = [*layer.trainable_variables, *(arguments if wrt_inputs else ())]
        return tape.gradient(result, sources, output_gradients=output_gradient)

    return both


def plain_fit(args, callbacks):
    """Trains the model of `args` as a straightforward Keras 3 program would: `keras.layers.RNN` over the cell,
    automatic differentiation, episodes from a Python generator (`keras.utils.PyDataset`), validation alike."""
    import keras
    import numpy as np

    import learning_to_learn as program

    class Episodes(keras.utils.PyDataset):
        def __init__(self, dataset, episodes, seed):
            super().__init__()
            self.images, self.episodes = dataset.data["images"], episodes
            self.generator = program.EpisodeGenerator(dataset, args.classes, args.images_per_class, seed)

        def __len__(self):
            return program.steps_per_epoch(self.episodes, args.batch_size)

        def __getitem__(self, batch):
            indices, labels = self.generator.sample(min(args.batch_size, self.episodes - batch * args.batch_size))
            return (self.images[indices], program.previous_labels(labels)), labels

    omniglot = program.Omniglot()
    model = program.model_for_training(args, fused=False)
    model.fit(Episodes(omniglot.train, args.train_episodes, args.seed), epochs=args.epochs,
              validation_data=Episodes(omniglot.test, args.test_episodes, np.random.default_rng(0)),
              verbose=0, callbacks=callbacks)


def measure(flags, plain=False):
    """Runs learning_to_learn.main (or `plain_fit`) in this process and returns its timings."""
    sys.path.insert(0, ROOT)
    import backends
    import learning_to_learn

    args = learning_to_learn.parse_args(flags)
    clock = epoch_clock()
    if plain:
        plain_fit(args, [clock])  # all cores, as main's default --threads=0
    else:
        learning_to_learn.main(args, callbacks=[clock])
    steady = sorted(clock.training_seconds[1:])[len(clock.training_seconds[1:]) // 2]
    epochs = sorted(end - start for start, end in zip(clock.epoch_ends[:-1], clock.epoch_ends[1:], strict=True))
    return {
        "episodes_per_second": args.train_episodes / steady,
        "with_validation": args.train_episodes / epochs[len(epochs) // 2],
        "first_epoch_end_s": clock.epoch_ends[0],
        "first_epoch_extra_s": clock.training_seconds[0] - steady,
        "whole_run_s": time.perf_counter() - START,
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "device": backends.device(),
    }


def profile(flags, batches=20):
    """Where the time of one training batch of the run of `flags` goes, in ms: the median of `batches` runs of
    each part, compiled as `fit` compiles the whole step (a `tf.function`, XLA on the recurrence's loops)."""
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np
    import tensorflow as tf

    import learning_to_learn as program

    # The whole step first, timed in `fit` over 50 batches an epoch: main sets the threads, before TensorFlow starts.
    args, clock = program.parse_args(flags), epoch_clock()
    steady_flags = [*flags, f"--train_episodes={args.batch_size * 50}", "--test_episodes=16", "--epochs=3"]
    program.main(program.parse_args(steady_flags), callbacks=[clock])
    step = 1000 * sorted(clock.training_seconds[1:])[0] / 50

    # The run's own input pipeline: its first batch feeds the parts, the next ones time the pipeline.
    omniglot = program.Omniglot()
    batch_iterator = iter(program.training_batches(
        program.with_rotations(omniglot.train) if args.rotations else omniglot.train, args.classes,
        args.images_per_class, args.batch_size, args.batch_size * (batches + 4), args.seed, range(1), shift=args.shift))
    model = program.model_for_training(args)
    recurrence = next(layer for layer in model.layers if isinstance(layer, keras.layers.RNN))
    features = keras.Model(model.inputs, recurrence.input)  # the CNN, the previous labels, the matches and vote
    (images, previous), labels = next(batch_iterator)
    inputs = features((images, previous))
    outputs = recurrence(inputs)

    def median_ms(function, *arguments):
        for _ in range(3):  # tracing, compiling, warming up
            call_seconds(function, *arguments)
        return 1000 * sorted(call_seconds(function, *arguments) for _ in range(batches))[batches // 2]

    def forward_and_backward(layer, layer_inputs, output_gradient, wrt_inputs):
        return median_ms(training_pass(layer, output_gradient, wrt_inputs), *layer_inputs)

    forward = {name: median_ms(tf.function(lambda *arguments, layer=layer: layer(*arguments, training=True)),
                               *layer_inputs)
               for name, layer, layer_inputs in [("cnn", features, [(images, previous)]),
                                                 ("recurrence", recurrence, [inputs])]}
    rng = np.random.default_rng(0)
    def random_like(tensor):
        return rng.normal(size=tensor.shape).astype(np.float32)

    both = {"cnn": forward_and_backward(features, [(images, previous)], random_like(inputs), False),
            "recurrence": forward_and_backward(recurrence, [inputs], random_like(outputs), True)}
    gradients = [tf.constant(rng.normal(size=variable.shape) * 1e-6, variable.dtype)
                 for variable in model.trainable_variables]
    optimizer = median_ms(tf.function(lambda: model.optimizer.apply(gradients, model.trainable_variables) or
                                      tf.constant(0)))
    pipeline_ms = median_ms(lambda: next(batch_iterator))
    parts = [("the CNN and the inputs' features, forward", forward["cnn"]),
             ("... backward", both["cnn"] - forward["cnn"]),
             ("the recurrence, forward", forward["recurrence"]),
             ("... backward", both["recurrence"] - forward["recurrence"]),
             ("Adam's update", optimizer)]
    return {"parts": parts, "step": step, "rest": step - sum(ms for _, ms in parts), "pipeline": pipeline_ms}


def speed_rows(options):
    rows = []
    for classes in options.classes:
        flags = [f"--classes={classes}", f"--train_episodes={options.train_episodes}",
                 f"--test_episodes={options.test_episodes}", f"--epochs={options.epochs}", *options.flags.split()]
        results = {}
        for backend in options.backends:
            for build in ["program", "plain"] if options.plain else ["program"]:
                child = subprocess.run([sys.executable, __file__, f"--child={json.dumps([build, flags])}"],
                                       capture_output=True, text=True, check=True,
                                       env={**os.environ, "KERAS_BACKEND": backend})
                results[backend, build] = json.loads(child.stdout.splitlines()[-1])
        # Each straightforward build beside the fastest program of this run.
        fastest, backend = max((result["episodes_per_second"], backend)
                               for (backend, build), result in results.items() if build == "program")
        for (_, build), result in results.items():
            lead = f" ({backend}'s program {fastest / result['episodes_per_second']:.1f}x)" if build == "plain" else ""
            batch_ms = 1000 * min(options.train_episodes, 16) / result["episodes_per_second"]
            rows.append(f"| {' '.join(flags[:1] + flags[4:])} | {build}{lead} | {result['device']} "
                        f"| {result['episodes_per_second']:.0f} | {result['with_validation']:.0f} | {batch_ms:.1f} "
                        f"| {result['first_epoch_end_s']:.1f} | {result['first_epoch_extra_s']:.1f} "
                        f"| {result['whole_run_s']:.1f} | {result['peak_memory_gb']:.2f} |")
    return ["| run | build | backend, device | steady episodes/s | with validation | ms a batch of 16 "
            "| first epoch ends (s) | first epoch's extra (s) | whole run (s) | peak memory (GB) |",
            "| --- " * 10 + "|", *rows]


def profile_rows(flags):
    child = subprocess.run([sys.executable, __file__, f"--child={json.dumps(['profile', flags])}"],
                           capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.splitlines()[-1])
    rows = [f"| {part} | {ms:.1f} | {100 * ms / result['step']:.0f}% |" for part, ms in result["parts"]]
    return ["| part of a training batch | ms | share |", "| --- | --- | --- |", *rows,
            f"| the rest: the output layer, the loss, the metrics, Keras | {result['rest']:.1f} "
            f"| {100 * result['rest'] / result['step']:.0f}% |",
            f"| the whole batch in `fit` | {result['step']:.1f} | 100% |",
            f"| the input pipeline alone (it overlaps the step) | {result['pipeline']:.1f} | |"]


def main(options):
    rows = profile_rows(options.profile.split()) if options.profile is not None else speed_rows(options)
    isa = ", ".join(f"{name}={os.environ[name]}" for name in ["ONEDNN_MAX_CPU_ISA", "XLA_FLAGS"] if name in os.environ)
    print(f"`{shlex.join(sys.argv)}`"
          + ("" if options.profile is not None else f" ({options.epochs} epochs x {options.train_episodes} training "
             f"+ {options.test_episodes} validation episodes)")
          + f"; {os.cpu_count()} cores of {cpu()}{', ' + isa if isa else ''}, {time.strftime('%Y-%m-%d')}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    options = bench.parse_args()
    if options.child:
        kind, flags = json.loads(options.child)
        print(json.dumps(profile(flags) if kind == "profile" else measure(flags, plain=kind == "plain")))
    else:
        main(options)
