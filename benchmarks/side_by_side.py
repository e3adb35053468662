#!/usr/bin/env python3
"""Times two checkouts of the program side by side: one process, the same batch, the two builds in turn.

    python3 benchmarks/side_by_side.py OLD_DIR NEW_DIR [--flags="--classes=20 ..."] [--rounds=40]

A 2-core machine's speed drifts by 20% between runs, more than most changes
gain; alternating the builds call by call holds both to the same moments.
Prints, for the recurrence's forward pass, its forward and backward pass and
the whole training step (`model.train_step`, the CNN and Adam included): each
build's median ms with its quartiles, and new / old. Both builds use OLD_DIR's
`omniglot_dataset.py`.
"""
import argparse
import glob
import importlib.util
import os
import shlex
import sys
import time

from speed import call_seconds, cpu, training_pass

bench = argparse.ArgumentParser(description=__doc__.splitlines()[0])
bench.add_argument("old", help="A checkout of the program.")
bench.add_argument("new", help="Another.")
bench.add_argument("--flags", default="", help="The program's flags of the model and episodes, quoted as one argument.")
bench.add_argument("--rounds", default=40, type=int, help="Calls of each build a part, after 3 to warm up.")


def load(name, directory):
    """The program's module in `directory`, imported as `name`, with the modules beside it of that directory: they
    stay the ones imported until the next build loads (trace a build's parts before)."""
    for beside in glob.glob(os.path.join(directory, "*.py")):  # the other build's of the same names, forgotten
        sys.modules.pop(os.path.basename(beside)[:-len(".py")], None)
    sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, "learning_to_learn.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def timed_parts(program, flags):
    """`{part: function}` of one build, each function running that part on one batch of random episodes."""
    import keras
    import numpy as np
    import tensorflow as tf

    args = program.parse_args(flags)
    keras.utils.set_random_seed(args.seed)
    model = program.model_for_training(args)
    recurrence = next(layer for layer in model.layers if isinstance(layer, keras.layers.RNN))
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((args.batch_size, *model.inputs[0].shape[1:]), np.float32))
    steps = images.shape[1]
    previous = tf.constant(rng.integers(-1, args.classes, (args.batch_size, steps), np.int32))
    labels = tf.constant(rng.integers(0, args.classes, (args.batch_size, steps), np.int32))
    inputs = keras.Model(model.inputs, recurrence.input)((images, previous))
    output_gradient = tf.constant(rng.normal(size=recurrence(inputs).shape).astype(np.float32))

    forward = tf.function(lambda: recurrence(inputs, training=True))
    backward = training_pass(recurrence, output_gradient, wrt_inputs=True)
    model.make_train_function()  # builds the optimizer's state
    step = tf.function(lambda: model.train_step(((images, previous), labels)))
    return {"the recurrence, forward": forward, "the recurrence, forward and backward": lambda: backward(inputs),
            "the training step": step}


def main(options):
    import numpy as np

    builds = {}
    for label, directory in [("old", options.old), ("new", options.new)]:
        builds[label] = timed_parts(load(f"learning_to_learn_{label}", directory), options.flags.split())
        for part in builds[label].values():
            for _ in range(3):  # tracing, compiling, warming up, while this build's modules are loaded
                call_seconds(part)
        sys.path.remove(directory)

    print(f"`{shlex.join(sys.argv)}`; {os.cpu_count()} cores of {cpu()}, {time.strftime('%Y-%m-%d')}; ms, median "
          "(quartiles)\n")
    print("| part | old | new | new / old |\n| --- | --- | --- | --- |")
    for part in builds["old"]:
        times = {label: [] for label in builds}
        for _ in range(options.rounds):
            for label, build in builds.items():
                times[label].append(1000 * call_seconds(build[part]))
        cells = [f"{np.median(times[label]):.1f} ({np.percentile(times[label], 25):.1f}-"
                 f"{np.percentile(times[label], 75):.1f})" for label in builds]
        print(f"| {part} | {' | '.join(cells)} | {np.median(times['new']) / np.median(times['old']):.3f} |",
              flush=True)


if __name__ == "__main__":
    main(bench.parse_args())
