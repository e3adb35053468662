"""TensorFlow's fast path for learning_to_learn.py: the memory cell's recurrence in loops compiled by XLA, with
the backward pass written by hand (`fused_recurrence.py`), and batch normalisation by TensorFlow's fused kernel.

What cuDNN is to `keras.layers.LSTM`, this module is to `MemoryAugmentedRNN` and `FusedBatchNormalization` on
TensorFlow: the same functions by a faster route, which those layers ask `backends` for and do without elsewhere.
`tests/test_memory_cell.py` holds the recurrence to the cell's own `call`, differentiated automatically.
"""
import math

import tensorflow as tf
from keras import ops

import backends
from fused_recurrence import (
    CellState,
    StepActivations,
    StepRecord,
    gradients_after_the_last_step,
    input_gradients,
    memory_register,
    outputs_and_states,
    projected_inputs,
    recorded_step,
    step_backward,
    step_weights,
)


def batch_normalization(layer, inputs):
    """A `keras.layers.BatchNormalization` `layer` of images `inputs` in training, by TensorFlow's fused kernel: one
    pass over the activations forward and one back, where Keras's separate ops make several, over the few-shot
    CNN's largest tensors. The same function and moving statistics, to float rounding."""
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(inputs, layer.gamma, layer.beta,
                                                               epsilon=layer.epsilon, is_training=True)
    # The kernel's variance is the unbiased one; Keras's moving variance follows the biased one.
    values = ops.cast(ops.size(inputs) // ops.shape(inputs)[-1], variance.dtype)
    variance = variance * (values - 1) / values
    layer.moving_mean.assign(layer.moving_mean * layer.momentum + mean * (1.0 - layer.momentum))
    layer.moving_variance.assign(layer.moving_variance * layer.momentum + variance * (1.0 - layer.momentum))
    return outputs


# The fused recurrence

def scan_steps(step, steps, carry, one_step, reverse=False):
    """`carry, outputs = step(t, carry)` for t = 0 .. steps - 1 (with `reverse`, from the last): the last carry
    and every step's outputs stacked, a structure like `one_step`. tf.scan would stack the carry as well: here
    the memory, steps times over."""
    arrays = [tf.TensorArray(output.dtype, size=steps, element_shape=output.shape)
              for output in tf.nest.flatten(one_step)]

    def body(i, carry, arrays):
        t = steps - 1 - i if reverse else i
        carry, outputs = step(t, carry)
        outputs = tf.nest.flatten(outputs)
        return i + 1, carry, [array.write(t, output) for array, output in zip(arrays, outputs, strict=True)]

    _, carry, arrays = tf.while_loop(lambda i, *_: i < steps, body, (0, carry, arrays))
    return carry, tf.nest.pack_sequence_as(one_step, [array.stack() for array in arrays])


def cores_in_use():
    """The cores TensorFlow runs ops on at once: --threads (which `main` holds to the usable cores), else all."""
    return min(tf.config.threading.get_inter_op_parallelism_threads() or math.inf, backends.usable_cores())



def recurrence(cell, sequences, initial_state, deterministic=False):
    """`keras.layers.RNN(cell).inner_loop` of a `MemoryAugmentedLSTM` `cell`, fused: `(last output, outputs,
    states)` of `sequences` (batch, steps, inputs) from `initial_state`, the cell's flat states.

    The cell's steps run in a loop compiled by XLA (one loop a core, each over its share of the episodes), and
    the backward pass through time is a second loop, of `step_backward`. Nor is the memory kept at every step:
    before step t it is the last writes and what was there before the first. `deterministic`: one loop, without
    XLA, as graded runs need (TensorFlow's op determinism does not cover XLA).
    """
    h, c, read_value, memory = initial_state
    state = CellState(h, c, read_value, ops.reshape(memory, (-1, cell.memory_cells, cell.cell_size)))
    projected = projected_inputs(cell, sequences)
    # Tensors, not variables: tf.custom_gradient would want to differentiate variables itself.
    weights = [tf.identity(weight) for weight in step_weights(cell)]
    # A step's small ops keep one core busy: each core runs the loops over its own share of the episodes, all
    # at once. Graded runs keep one loop, so that their results do not depend on the cores.
    parts = 1 if deterministic else min(cores_in_use(), h.shape[0] or math.inf)
    batch_size = ops.shape(h)[0]
    shares = [(batch_size + part) // parts for part in range(parts)]  # within one episode of each other
    pieces = zip(tf.split(projected, shares, axis=1), *[tf.split(tensor, shares) for tensor in state], strict=True)
    hs, read_values, c, memory = zip(*[fused_steps(cell, deterministic, *piece, *weights) for piece in pieces],
                                     strict=True)
    hs, read_values = ops.concatenate(hs, axis=1), ops.concatenate(read_values, axis=1)  # time first
    return outputs_and_states(cell, hs, read_values, ops.concatenate(c), ops.concatenate(memory))


def fused_steps(cell, deterministic, projected, h, c, read_value, memory, *weights):
    """The cell's steps over `projected` (steps, batch, 4 * units) from the state (h, c, read value, memory).

    Returns every step's h and read value, the last c and the last memory.
    """
    def compiled(loop):
        # XLA fuses the many small ops of each step into a few kernels.
        return loop if deterministic else tf.function(loop, jit_compile=True)

    @tf.custom_gradient
    def recurrence(*inputs):
        # The gradient is `backward`'s: an eager tape must not record the loop as well (through XLA it cannot).
        projected, h, c, read_value, memory, *weights = [tf.stop_gradient(tensor) for tensor in inputs]
        steps, batch_size = projected.shape[0], ops.shape(h)[0]

        one_step = (h, c, read_value, memory[:, 0],
                    StepActivations(projected[0], ops.zeros((batch_size, cell.interface_size)),
                                    ops.zeros((batch_size, cell.read_heads, cell.memory_cells))))
        last, (hs, cs, read_values, writes, activations) = compiled(lambda: scan_steps(
            lambda t, state: recorded_step(cell, projected[t], state, weights), steps,
            CellState(h, c, read_value, memory), one_step))()
        c_before = ops.concatenate([c[None], cs[:-1]])  # (steps, batch, units)
        written = memory_register(writes, memory)

        def backward(d_hs, d_read_values, d_c_last, d_memory_last):
            # Turned once, outside the loop: XLA's products with a turned operand take twice as long.
            recurrent_kernel_turned, interface_kernel_turned = [ops.transpose(weight) for weight in weights[:2]]

            def backward_step(t, d_after):
                memory_before = ops.transpose(tf.slice(written, [steps - t, 0, 0], [cell.memory_cells, -1, -1]),
                                              [1, 0, 2])
                record = StepRecord(d_hs[t], d_read_values[t], c_before[t], cs[t], memory_before,
                                    StepActivations(*[field[t] for field in activations]))
                d = step_backward(cell, d_after, record, recurrent_kernel_turned, interface_kernel_turned)
                return d, (d.gates, d.interface)

            from_last = gradients_after_the_last_step(h, read_value, d_c_last, d_memory_last, activations)
            d_first, (d_gates, d_interface) = compiled(lambda: scan_steps(
                backward_step, steps, from_last, (from_last.gates, from_last.interface), reverse=True))()
            return input_gradients(cell, h, read_value, hs, read_values, d_first, d_gates, d_interface)

        return (hs, read_values, last.c, last.memory), backward

    return recurrence(projected, h, c, read_value, memory, *weights)


