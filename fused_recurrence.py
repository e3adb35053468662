"""The memory cell's step and its backward pass written by hand, in keras.ops: what the backends' fused loops
(`tensorflow_fused.py`, `jax_fused.py`) run instead of differentiating the cell's loop automatically.

Automatic differentiation of a loop adds up every weight's gradient step by step in small matrix products;
the backward loop here emits the gradients of each step's gates and interface, and each weight's gradient is
then one large product over all steps. `tests/test_memory_cell.py` holds both to the cell's own `call`.
"""
from typing import Any, NamedTuple

import keras
from keras import ops

EPSILON = keras.config.epsilon()  # the floor of ops.normalize on a norm, as the cell's
Tensor = Any  # a tensor of the backend in use


def unit_vectors(x):
    """`ops.normalize(x)` over the last axis, and the inverse norms it used (the backward pass needs them)."""
    inverse_norms = ops.minimum(ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1 / EPSILON)
    return ops.multiply(x, inverse_norms), inverse_norms


class CellState(NamedTuple):
    """What the cell carries from one step to the next."""
    h: Tensor  # (batch, units): the controller's output
    c: Tensor  # (batch, units): the controller's cell
    read_value: Tensor  # (batch, read_heads * cell_size): the last read of every head
    memory: Tensor  # (batch, memory_cells, cell_size): the newest write first


def unit_vectors_backward(units, inverse_norms, gradient):
    """The gradient with respect to x, given the `gradient` with respect to `unit_vectors(x)`."""
    # An empty cell's norm is floored: the cell was only scaled, with no projection to undo.
    floored = ops.cast(inverse_norms >= 1 / EPSILON, units.dtype)
    along = ops.sum(units * gradient, axis=-1, keepdims=True)
    return inverse_norms * (gradient - (1 - floored) * units * along)


class StepActivations(NamedTuple):
    """What a step computes on the way, kept for the fused backward pass."""
    gates: Tensor  # (batch, 4 * units): the controller's input, forget, candidate and output gates, activated
    interface: Tensor  # (batch, (read_heads + 1) * cell_size): the write value, then the read keys
    read_weights: Tensor  # (batch, read_heads, memory_cells)


class StepRecord(NamedTuple):
    """One forward step as its backward pass needs it."""
    d_h: Tensor  # (batch, units): the gradient of the loss through the step's output
    d_read_value: Tensor  # (batch, read_size): likewise
    c_before: Tensor  # (batch, units)
    c_after: Tensor  # (batch, units)
    memory_before: Tensor  # (batch, memory_cells, cell_size): the memory the step read
    activations: StepActivations


class StepGradients(NamedTuple):
    """Gradients of the loss that one step sends back to the step before it."""
    h_read_before: Tensor  # (batch, units + read_size): of [h, read value], through the gates
    c_before: Tensor  # (batch, units)
    memory_before: Tensor  # (batch, memory_cells, cell_size)
    gates: Tensor  # (batch, 4 * units): of the step's gates before their activations
    interface: Tensor  # (batch, (read_heads + 1) * cell_size): of the interface before its tanh


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
    """The weights `step` uses: [h, read value] -> gates, and the interface layer's kernel and bias."""
    controller, input_size = cell.controller, cell.input_size
    recurrent = ops.concatenate([controller.recurrent_kernel, controller.kernel[input_size:]])
    return recurrent, cell.interface_layer.kernel, cell.interface_layer.bias


def projected_inputs(cell, sequences):
    """The part of the gates that comes from the cell's inputs `sequences` (batch, steps, inputs), which does not
    recur: (steps, batch, 4 * units), time first (the inputs turn, not their 8 times wider projection)."""
    kernel = cell.controller.kernel[:cell.input_size]
    return ops.matmul(ops.transpose(sequences, [1, 0, 2]), kernel) + cell.controller.bias


def recorded_step(cell, projected_input, state, weights):
    """`step`, and what a forward loop keeps of it for the backward pass: `(state after, (h, c, read value, the
    write, the StepActivations))`."""
    state, activations = step(cell, projected_input, state, weights)
    return state, (state.h, state.c, state.read_value, state.memory[:, 0], activations)


def memory_register(writes, memory):
    """Every memory the steps read, in one tensor (steps + cells, batch, cell_size), from every step's write (time
    first) and the memory before the first step (batch, cells, cell_size). The memory is a shift register: before
    step t it holds the last writes, newest first, then the memory before the first step: rows steps - t onwards."""
    return ops.concatenate([ops.flip(writes, axis=0), ops.transpose(memory, [1, 0, 2])])


def gradients_after_the_last_step(h, read_value, d_c_last, d_memory_last, activations):
    """The `StepGradients` that the backward loop starts from: those of the last c and memory, and zeros."""
    return StepGradients(ops.zeros_like(ops.concatenate([h, read_value], axis=-1)), d_c_last, d_memory_last,
                         ops.zeros_like(activations.gates[0]), ops.zeros_like(activations.interface[0]))


def input_gradients(cell, h, read_value, hs, read_values, d_first, d_gates, d_interface):
    """The gradients of the fused loop's inputs (projected inputs, h, c, read value, memory, *`step_weights`),
    from every step's (time first) gate and interface gradients and the first step's `StepGradients` `d_first`.
    `h`, `read_value`: before the first step; `hs`, `read_values`: after each. Each weight's gradient is one
    product over all steps and episodes."""
    h_read_before = ops.concatenate([ops.concatenate([h[None], hs[:-1]]),
                                     ops.concatenate([read_value[None], read_values[:-1]])], axis=-1)
    d_weights = [ops.tensordot(h_read_before, d_gates, [[0, 1], [0, 1]]),
                 ops.tensordot(hs, d_interface, [[0, 1], [0, 1]]), ops.sum(d_interface, axis=[0, 1])]
    d_h, d_read_value = d_first.h_read_before[:, :cell.units], d_first.h_read_before[:, cell.units:]
    return d_gates, d_h, d_first.c_before, d_read_value, d_first.memory_before, *d_weights


def outputs_and_states(cell, hs, read_values, c, memory):
    """`keras.layers.RNN.inner_loop`'s `(last output, outputs, states)` from every step's h and read value (time
    first), the last c and the last memory: the output layer, which does not recur, over all steps at once."""
    outputs = ops.transpose(cell.output_layer(ops.concatenate([hs, read_values], axis=-1)), [1, 0, 2])
    states = [hs[-1], c, read_values[-1], ops.reshape(memory, (-1, cell.memory_cells * cell.cell_size))]
    return outputs[:, -1], outputs, states


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

