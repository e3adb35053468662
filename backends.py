"""What differs between Keras's backends (TensorFlow, JAX, PyTorch) for learning_to_learn.py: threads,
determinism, the device a run trains on, how much of a training step is compiled, the errors that say memory ran
out, several devices, and the fused kernels a backend offers beside the method's plain layers.

The method asks here and names no backend itself. Nothing here imports a backend's framework before it is asked.
"""
import importlib
import os

# TensorFlow's C++ start-up notices would bury the epoch lines; 3 also hides the cuInit error of a machine
# without a GPU. Failures still arrive as Python exceptions. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402


def usable_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def configure(threads, deterministic):
    """Runs ops on `threads` CPU threads (0: the backend's choice) and, where `deterministic`, gives the same
    results in every run on one machine. Called before the first op: some backends fix their threads then."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        if deterministic:
            tf.config.experimental.enable_op_determinism()
    elif backend == "jax":
        # XLA's CPU client reads XLA_FLAGS when it starts, at the first op: it can run one thread, or all the
        # cores. Its CPU kernels are deterministic on their own.
        if threads == 1:
            os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()
    elif backend == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def device():
    """The backend and the devices a run trains on, in words: `jax, 1 GPU (NVIDIA H100 80GB HBM3)`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"tensorflow, {f'{len(gpus)} GPU' if gpus else 'CPU'}"
    if backend == "jax":
        import jax

        devices = jax.devices()
        kind = devices[0].platform.upper()
        return (f"jax, {len(devices)} {kind}" + (f" ({devices[0].device_kind})" if kind != "CPU" else "")
                + (", each batch split across them" if len(devices) > 1 else ""))
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"torch, {torch.cuda.device_count()} GPU ({torch.cuda.get_device_name()})"
        return "torch, CPU"
    return backend


def whole_step_compiled():
    """`jit_compile` for `compile`. TensorFlow's own CPU kernels convolve faster than XLA's, so there XLA
    compiles only the fused recurrence's loops; JAX compiles the whole step; PyTorch runs it eagerly."""
    return False if keras.backend.backend() == "tensorflow" else "auto"


def out_of_memory_errors():
    """The exceptions by which the backend says that memory ran out."""
    errors = [MemoryError]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        errors.append(tf.errors.ResourceExhaustedError)
    elif backend == "torch":
        import torch

        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def distribute_over_devices():
    """Splits each batch across the accelerators (or XLA's host devices) JAX sees, where it sees more than one,
    by `keras.distribution.DataParallel`: the same function, each device a share of the episodes. Other backends
    train on one device here (`tf.distribute` does not train Keras 3 models across workers)."""
    if keras.backend.backend() == "jax" and len(devices := keras.distribution.list_devices()) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))


FUSED_KERNELS = {"tensorflow": "tensorflow_fused", "jax": "jax_fused"}  # PyTorch runs the plain cell


def fused_kernels():
    """The module of the backend's fused `recurrence` (and `batch_normalization`, where it has one), or None where
    it has none: then the method's layers run as Keras runs them."""
    module = FUSED_KERNELS.get(keras.backend.backend())
    return module and importlib.import_module(module)
