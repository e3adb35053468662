"""TensorFlow's fast path for learning_to_learn.py: the memory cell's recurrence fused, with a backward pass written
by hand, and batch normalisation through TensorFlow's fused kernel.

What cuDNN is to `keras.layers.LSTM`, this module is to `MemoryAugmentedRNN` and `FusedBatchNormalization` on
TensorFlow: the same functions by a faster route, which those layers ask `backends` for and do without elsewhere.
`tests/test_memory_cell.py` holds the recurrence to the cell's own `call`, differentiated automatically.
"""
import math
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops

import backends

EPSILON = keras.config.epsilon()  # the floor of ops.normalize on a norm, as the cell's


def unit_vectors(x):
    """`ops.normalize(x)` over the last axis, and the inverse norms it used (the backward pass needs them)."""
    inverse_norms = ops.minimum(ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1 / EPSILON)
    return x * inverse_norms, inverse_norms


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

class CellState(NamedTuple):
    """What the cell carries from one step to the next."""
    h: tf.Tensor  # (batch, units): the controller's output
    c: tf.Tensor  # (batch, units): the controller's cell
    read_value: tf.Tensor  # (batch, read_heads * cell_size): the last read of every head
    memory: tf.Tensor  # (batch, memory_cells, cell_size): the newest write first


def unit_vectors_backward(units, inverse_norms, gradient):
    """The gradient with respect to x, given the `gradient` with respect to `unit_vectors(x)`."""
    # An empty cell's norm is floored: the cell was only scaled, with no projection to undo.
    floored = ops.cast(inverse_norms >= 1 / EPSILON, units.dtype)
    along = ops.sum(units * gradient, axis=-1, keepdims=True)
    return inverse_norms * (gradient - (1 - floored) * units * along)


class StepActivations(NamedTuple):
    """What a step computes on the way, kept for the fused backward pass."""
    gates: tf.Tensor  # (batch, 4 * units): the controller's input, forget, candidate and output gates, activated
    interface: tf.Tensor  # (batch, (read_heads + 1) * cell_size): the write value, then the read keys
    read_weights: tf.Tensor  # (batch, read_heads, memory_cells)


class StepRecord(NamedTuple):
    """One forward step as its backward pass needs it."""
    d_h: tf.Tensor  # (batch, units): the gradient of the loss through the step's output
    d_read_value: tf.Tensor  # (batch, read_size): likewise
    c_before: tf.Tensor  # (batch, units)
    c_after: tf.Tensor  # (batch, units)
    memory_before: tf.Tensor  # (batch, memory_cells, cell_size): the memory the step read
    activations: StepActivations


class StepGradients(NamedTuple):
    """Gradients of the loss that one step sends back to the step before it."""
    h_read_before: tf.Tensor  # (batch, units + read_size): of [h, read value], through the gates
    c_before: tf.Tensor  # (batch, units)
    memory_before: tf.Tensor  # (batch, memory_cells, cell_size)
    gates: tf.Tensor  # (batch, 4 * units): of the step's gates before their activations
    interface: tf.Tensor  # (batch, (read_heads + 1) * cell_size): of the interface before its tanh


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



def step(cell, projected_input, state, weights):
    """The cell's step (`MemoryAugmentedLSTM.call`), from its input's share of the gates `projected_input`
    (batch, 4 * units) and the `CellState` before it, with the `step_weights`: the `CellState` after the step and
    its `StepActivations`, which `step_backward` differentiates. The same ops in the same order as the cell's."""
    recurrent_kernel, interface_kernel, interface_bias = weights
    # The controller: an LSTM over the input and the last read value.
    gates = projected_input + ops.matmul(ops.concatenate([state.h, state.read_value], axis=-1), recurrent_kernel)
    input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
    gates = [ops.sigmoid(input_gate), ops.sigmoid(forget_gate), ops.tanh(candidate), ops.sigmoid(output_gate)]
    c = gates[1] * state.c + gates[0] * gates[2]
    h = gates[3] * ops.tanh(c)

    # The interface: one write value and a key for each read head.
    interface = ops.matmul(h, interface_kernel) + interface_bias
    write_value, read_keys = ops.tanh(interface[:, :cell.cell_size]), ops.tanh(interface[:, cell.cell_size:])
    interface = ops.concatenate([write_value, read_keys], axis=-1)
    read_keys = ops.reshape(read_keys, (ops.shape(h)[0], cell.read_heads, cell.cell_size))

    # Read the memory as it was, then write.
    similarity = ops.einsum("bhc,bmc->bhm", unit_vectors(read_keys)[0], unit_vectors(state.memory)[0])
    read_weights = ops.softmax(cell.read_sharpness * similarity, axis=-1)
    read_value = ops.reshape(ops.matmul(read_weights, state.memory), (ops.shape(h)[0], cell.read_size))
    memory = ops.concatenate([write_value[:, None], state.memory[:, :-1]], axis=1)
    return CellState(h, c, read_value, memory), StepActivations(ops.concatenate(gates, axis=-1), interface,
                                                                read_weights)


def step_weights(cell):
    """The weights `step` uses, as tensors (tf.custom_gradient would differentiate variables itself): [h, read
    value] -> gates, and the interface layer's kernel and bias."""
    controller, input_size = cell.controller, cell.input_size
    recurrent = ops.concatenate([controller.recurrent_kernel, controller.kernel[input_size:]])
    return [tf.identity(weight) for weight in (recurrent, cell.interface_layer.kernel, cell.interface_layer.bias)]


def recurrence(cell, sequences, initial_state, deterministic=False):
    """`keras.layers.RNN(cell).inner_loop` of a `MemoryAugmentedLSTM` `cell`, fused: `(last output, outputs,
    states)` of `sequences` (batch, steps, inputs) from `initial_state`, the cell's flat states.

    The cell's steps run in a loop compiled by XLA (one loop a core, each over its share of the episodes), and
    the backward pass through time is a second loop written by hand: automatic differentiation of a loop adds
    up every weight's gradient step by step in small matrix products, while here the backward loop emits the
    gradients of each step's gates and interface, and each weight's gradient is then one large product over all
    steps. The input projection and the output layer do not recur: they run over all steps at once. Nor is the
    memory kept at every step: before step t it is the last writes and what was there before the first.
    `deterministic`: one loop, without XLA, as graded runs need (TensorFlow's op determinism does not cover XLA).
    """
    h, c, read_value, memory = initial_state
    state = CellState(h, c, read_value, ops.reshape(memory, (-1, cell.memory_cells, cell.cell_size)))
    # (steps, batch, 4 * units), time first: the inputs turn, not their 8 times wider projection.
    projected = (ops.matmul(ops.transpose(sequences, [1, 0, 2]), cell.controller.kernel[:cell.input_size])
                 + cell.controller.bias)
    weights = step_weights(cell)
    # A step's small ops keep one core busy: each core runs the loops over its own share of the episodes, all
    # at once. Graded runs keep one loop, so that their results do not depend on the cores.
    parts = 1 if deterministic else min(cores_in_use(), h.shape[0] or math.inf)
    batch_size = ops.shape(h)[0]
    shares = [(batch_size + part) // parts for part in range(parts)]  # within one episode of each other
    pieces = zip(tf.split(projected, shares, axis=1), *[tf.split(tensor, shares) for tensor in state], strict=True)
    hs, read_values, c, memory = zip(*[fused_steps(cell, deterministic, *piece, *weights) for piece in pieces],
                                     strict=True)
    hs, read_values = ops.concatenate(hs, axis=1), ops.concatenate(read_values, axis=1)  # time first
    c, memory = ops.concatenate(c), ops.concatenate(memory)
    outputs = cell.output_layer(ops.concatenate([hs, read_values], axis=-1))
    outputs = ops.transpose(outputs, [1, 0, 2])
    states = [hs[-1], c, read_values[-1], ops.reshape(memory, (-1, cell.memory_cells * cell.cell_size))]
    return outputs[:, -1], outputs, states


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

        def forward_step(t, state):
            state, activations = step(cell, projected[t], state, weights)
            return state, (state.h, state.c, state.read_value, state.memory[:, 0], activations)

        one_step = (h, c, read_value, memory[:, 0],
                    StepActivations(projected[0], ops.zeros((batch_size, cell.interface_size)),
                                    ops.zeros((batch_size, cell.read_heads, cell.memory_cells))))
        last, (hs, cs, read_values, writes, activations) = compiled(lambda: scan_steps(
            forward_step, steps, CellState(h, c, read_value, memory), one_step))()
        c_before = ops.concatenate([c[None], cs[:-1]])  # (steps, batch, units)
        # The memory is a shift register: before step t it holds the last writes, newest first, then the
        # memory before the first step. All of them in one tensor, (steps + cells, batch, cell_size).
        written = ops.concatenate([ops.flip(writes, axis=0), ops.transpose(memory, [1, 0, 2])])

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

            from_last = StepGradients(ops.zeros_like(ops.concatenate([h, read_value], axis=-1)), d_c_last,
                                      d_memory_last, ops.zeros_like(activations.gates[0]),
                                      ops.zeros_like(activations.interface[0]))
            d_first, (d_gates, d_interface) = compiled(lambda: scan_steps(
                backward_step, steps, from_last, (from_last.gates, from_last.interface), reverse=True))()

            # Each weight's gradient: one product over all steps and episodes.
            h_read_before = ops.concatenate([ops.concatenate([h[None], hs[:-1]]),
                                             ops.concatenate([read_value[None], read_values[:-1]])], axis=-1)
            d_weights = [ops.tensordot(h_read_before, d_gates, [[0, 1], [0, 1]]),
                         ops.tensordot(hs, d_interface, [[0, 1], [0, 1]]), ops.sum(d_interface, axis=[0, 1])]
            d_h, d_read_value = d_first.h_read_before[:, :cell.units], d_first.h_read_before[:, cell.units:]
            return d_gates, d_h, d_first.c_before, d_read_value, d_first.memory_before, *d_weights

        return (hs, read_values, last.c, last.memory), backward

    return recurrence(projected, h, c, read_value, memory, *weights)


def step_backward(cell, d_after, step, recurrent_kernel_turned, interface_kernel_turned):
    """`step` differentiated by hand: the `StepGradients` it sends to the step before,
    from those it got from the step after (`d_after`) and the `StepRecord` of its forward pass."""
    batch_size = ops.shape(step.d_h)[0]
    heads_shape = (batch_size, cell.read_heads, cell.cell_size)
    d_h = step.d_h + d_after.h_read_before[:, :cell.units]
    d_read_value = ops.reshape(step.d_read_value + d_after.h_read_before[:, cell.units:], heads_shape)
    gates, interface, read_weights = step.activations

    # The read: read_value = read_weights @ memory, read_weights = softmax(sharpness * unit keys @ unit cells).
    unit_keys, key_norms = unit_vectors(ops.reshape(interface[:, cell.cell_size:], heads_shape))
    unit_cells, cell_norms = unit_vectors(step.memory_before)
    d_read_weights = ops.einsum("bhc,bmc->bhm", d_read_value, step.memory_before)
    d_logits = read_weights * (d_read_weights - ops.sum(read_weights * d_read_weights, -1, keepdims=True))
    d_similarity = cell.read_sharpness * d_logits
    d_keys = unit_vectors_backward(unit_keys, key_norms, ops.einsum("bhm,bmc->bhc", d_similarity, unit_cells))
    d_memory = (ops.einsum("bhm,bhc->bmc", read_weights, d_read_value)
                + unit_vectors_backward(unit_cells, cell_norms,
                                        ops.einsum("bhm,bhc->bmc", d_similarity, unit_keys))
                # the write: cell i + 1 after the step was cell i before it
                + ops.pad(d_after.memory_before[:, 1:], [[0, 0], [0, 1], [0, 0]]))
    d_keys = ops.reshape(d_keys, (batch_size, cell.read_heads * cell.cell_size))
    # The write value is cell 0 after the step.
    d_tanh = ops.concatenate([d_after.memory_before[:, 0], d_keys], axis=-1)
    d_interface = d_tanh * (1 - interface * interface)
    d_h = d_h + ops.matmul(d_interface, interface_kernel_turned)

    # The controller: c = f * c_before + i * g, h = o * tanh(c).
    input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
    tanh_c = ops.tanh(step.c_after)
    d_c = d_after.c_before + d_h * output_gate * (1 - tanh_c * tanh_c)
    d_gates = ops.concatenate([d_c * candidate * input_gate * (1 - input_gate),
                               d_c * step.c_before * forget_gate * (1 - forget_gate),
                               d_c * input_gate * (1 - candidate * candidate),
                               d_h * tanh_c * output_gate * (1 - output_gate)], axis=-1)
    return StepGradients(ops.matmul(d_gates, recurrent_kernel_turned), d_c * forget_gate, d_memory,
                         d_gates, d_interface)

