"""JAX's fast path for learning_to_learn.py: the memory cell's recurrence as one `jax.lax.scan`, with the backward
pass through time written by hand (`fused_recurrence.py`) as its `jax.custom_vjp`.

What cuDNN is to `keras.layers.LSTM`, this module is to `MemoryAugmentedRNN` on JAX: the same function by another
route, which the layer asks `backends` for. `tests/test_memory_cell.py` holds it to the cell's own `call`.
"""
import jax
from keras import ops

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


def recurrence(cell, sequences, initial_state, deterministic=False):
    """`keras.layers.RNN(cell).inner_loop` of a `MemoryAugmentedLSTM` `cell`: `(last output, outputs, states)` of
    `sequences` (batch, steps, inputs) from `initial_state`, the cell's flat states. JAX's CPU and GPU kernels
    give the same results every run: `deterministic` asks nothing more."""
    h, c, read_value, memory = initial_state
    memory = ops.reshape(memory, (-1, cell.memory_cells, cell.cell_size))
    weights = [ops.convert_to_tensor(weight) for weight in step_weights(cell)]
    hs, read_values, c, memory = fused_steps(cell)(projected_inputs(cell, sequences), h, c, read_value, memory,
                                                   *weights)
    return outputs_and_states(cell, hs, read_values, c, memory)


def fused_steps(cell):
    """The function of (projected inputs (steps, batch, 4 * units), h, c, read value, memory, *step weights) that
    runs the cell's steps: every step's h and read value, the last c and the last memory."""

    def forward(projected, h, c, read_value, memory, *weights):
        last, (hs, cs, read_values, writes, activations) = jax.lax.scan(
            lambda state, projected_input: recorded_step(cell, projected_input, state, weights),
            CellState(h, c, read_value, memory), projected)
        return (hs, read_values, last.c, last.memory), (h, c, read_value, memory, weights, hs, cs, read_values,
                                                         writes, activations)

    def backward(kept, gradients):
        h, c, read_value, memory, weights, hs, cs, read_values, writes, activations = kept
        d_hs, d_read_values, d_c_last, d_memory_last = gradients
        steps = hs.shape[0]
        c_before = ops.concatenate([c[None], cs[:-1]])
        written = memory_register(writes, memory)
        recurrent_kernel_turned, interface_kernel_turned = [ops.transpose(weight) for weight in weights[:2]]

        def backward_step(d_after, at_step):
            t, d_h, d_read_value, c_before_t, c_after, step_activations = at_step
            memory_before = jax.lax.dynamic_slice_in_dim(written, steps - t, cell.memory_cells, axis=0)
            record = StepRecord(d_h, d_read_value, c_before_t, c_after, ops.transpose(memory_before, [1, 0, 2]),
                                StepActivations(*step_activations))
            d = step_backward(cell, d_after, record, recurrent_kernel_turned, interface_kernel_turned)
            return d, (d.gates, d.interface)

        from_last = gradients_after_the_last_step(h, read_value, d_c_last, d_memory_last, activations)
        d_first, (d_gates, d_interface) = jax.lax.scan(
            backward_step, from_last, (ops.arange(steps), d_hs, d_read_values, c_before, cs, tuple(activations)),
            reverse=True)
        return input_gradients(cell, h, read_value, hs, read_values, d_first, d_gates, d_interface)

    @jax.custom_vjp
    def steps(*inputs):
        return forward(*inputs)[0]

    steps.defvjp(forward, backward)
    return steps
