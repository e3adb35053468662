"""The memory-augmented cell against a plain numpy version of the same equations."""
import keras
import numpy as np
import pytest

import backends
import fused_recurrence
from conftest import tensorflow_only
from learning_to_learn import MemoryAugmentedLSTM, MemoryAugmentedRNN, unit_vectors

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    import tensorflow_fused

EPSILON = keras.config.epsilon()  # ops.normalize floors a norm at Keras's epsilon, 1e-7


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def unit(x):
    """x / max(|x|, epsilon): a vector shorter than epsilon is only scaled, an empty one stays empty."""
    return x / max(np.linalg.norm(x), EPSILON)


def cosine(a, b):
    return unit(a) @ unit(b)


def numpy_step(cell, x, h, c, read_value, memory):
    """One step of the cell, head by head and cell by cell; memory: (batch, cells, cell_size)."""
    kernel, recurrent_kernel, bias = [keras.ops.convert_to_numpy(w) for w in cell.controller.weights]
    gates = np.concatenate([x, read_value], axis=-1) @ kernel + h @ recurrent_kernel + bias
    i, f, g, o = np.split(gates, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)

    interface_kernel, interface_bias = [keras.ops.convert_to_numpy(w) for w in cell.interface_layer.weights]
    interface = np.tanh(h @ interface_kernel + interface_bias)
    assert interface.shape == (len(x), (cell.read_heads + 1) * cell.cell_size)
    write_value = interface[:, :cell.cell_size]
    keys = interface[:, cell.cell_size:].reshape(len(x), cell.read_heads, cell.cell_size)

    reads = np.zeros_like(keys)
    for b in range(len(x)):
        for head in range(cell.read_heads):
            similarity = np.array([cosine(keys[b, head], m) for m in memory[b]])
            weights = np.exp(cell.read_sharpness * similarity)
            weights /= weights.sum()
            reads[b, head] = sum(w * m for w, m in zip(weights, memory[b], strict=True))
    read_value = reads.reshape(len(x), -1)
    memory = np.concatenate([write_value[:, None], memory[:, :-1]], axis=1)

    output_kernel, output_bias = [keras.ops.convert_to_numpy(w) for w in cell.output_layer.weights]
    output = np.tanh(np.concatenate([h, read_value], axis=-1) @ output_kernel + output_bias)
    return output, h, c, read_value, memory


def numpy_recurrence(cell, inputs, h, c, read_value, memory):
    """`numpy_step` over every step of `inputs` (batch, steps, features): every output, and the last state with
    the memory flat, as a Keras RNN returns them."""
    outputs = []
    for step in range(inputs.shape[1]):
        output, h, c, read_value, memory = numpy_step(cell, inputs[:, step], h, c, read_value, memory)
        outputs.append(output)
    return [np.stack(outputs, axis=1), h, c, read_value, memory.reshape(len(memory), -1)]


@pytest.mark.parametrize("read_sharpness", [1.0, 4.0])
def test_rnn_over_cell_matches_numpy_with_several_heads_and_memory_shift(read_sharpness):
    batch, steps, features = 2, 6, 5
    units, memory_cells, cell_size, read_heads = 7, 4, 3, 3  # 6 steps > 4 cells: old cells drop
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=[batch, steps, features]).astype(np.float32)
    h = rng.normal(size=[batch, units]).astype(np.float32)
    c = rng.normal(size=[batch, units]).astype(np.float32)
    read_value = rng.normal(size=[batch, read_heads * cell_size]).astype(np.float32)
    memory = rng.normal(size=[batch, memory_cells, cell_size]).astype(np.float32)

    cell = MemoryAugmentedLSTM(units, memory_cells, cell_size, read_heads, read_sharpness)
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    outputs = rnn(inputs, initial_state=[h, c, read_value, memory.reshape(batch, -1)])
    outputs = [keras.ops.convert_to_numpy(output) for output in outputs]
    for actual, expected in zip(outputs, numpy_recurrence(cell, inputs, h, c, read_value, memory), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_default_zero_state_reads_zeros_first():
    cell = MemoryAugmentedLSTM(units=4, memory_cells=3, cell_size=2, read_heads=2)
    rnn = keras.layers.RNN(cell, return_state=True)
    _, _, _, read_value, memory = [keras.ops.convert_to_numpy(x) for x in rnn(np.ones([1, 1, 3], np.float32))]
    # An empty memory has no direction: the read is the average of zero cells.
    np.testing.assert_array_equal(read_value, np.zeros([1, 4]))
    # After one step the write value is the first cell, the rest still empty.
    assert np.any(memory[0, :2] != 0) and np.all(memory[0, 2:] == 0)


def one_step(cell, memory, keys, write_value):
    """The cell's step from `memory` (1, cells, cell_size), its interface set to give the read `keys`
    (1, heads, cell_size) and `write_value` (1, cell_size), entries in (-1, 1): the read value and the memory after."""
    cell.build((None, 1))
    cell.interface_layer.kernel.assign(np.zeros(cell.interface_layer.kernel.shape))
    cell.interface_layer.bias.assign(np.arctanh(np.concatenate([write_value[0], keys[0].reshape(-1)])))
    states = [np.zeros([1, cell.units], np.float32)] * 2 + [np.zeros([1, cell.read_size], np.float32),
                                                            memory.reshape(1, -1)]
    _, (_, _, read_value, memory) = cell(np.zeros([1, 1], np.float32), states)
    return keras.ops.convert_to_numpy(read_value), keras.ops.convert_to_numpy(memory).reshape(1, cell.memory_cells, -1)


def test_write_prepends_and_drops_the_last_cell():
    cell = MemoryAugmentedLSTM(units=4, memory_cells=3, cell_size=2, read_heads=1)
    memory = np.array([[[1, 2], [3, 4], [5, 6]]], np.float32)
    _, written = one_step(cell, memory, np.array([[[0.1, 0.2]]]), np.array([[0.7, 0.8]]))
    np.testing.assert_allclose(written, [[[0.7, 0.8], [1, 2], [3, 4]]], rtol=1e-6)


@pytest.mark.parametrize("norm", [1e-8, 5e-8, 1e-7, 2e-7, 1e-5, 1e-2, 1.0])
def test_unit_vectors_divide_by_the_norm_floored_at_epsilon(norm):
    x = np.array([[3, -4, 12], [0, 0, 0]], np.float32) / 13 * np.float32(norm)  # a vector of that norm, an empty one
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unit_vectors(x)), [unit(x[0]), unit(x[1])], rtol=1e-5,
                               atol=0)
    # The hand-written backward pass's own, with the inverse norms it used.
    units, inverse_norms = (keras.ops.convert_to_numpy(y) for y in fused_recurrence.unit_vectors(x))
    np.testing.assert_allclose(units, [unit(x[0]), unit(x[1])], rtol=1e-5, atol=0)
    np.testing.assert_allclose(inverse_norms, [[1 / max(norm, EPSILON)], [1 / EPSILON]], rtol=1e-5)


def test_read_of_a_tiny_cell_uses_the_floored_norm():
    cell = MemoryAugmentedLSTM(units=4, memory_cells=3, cell_size=3, read_heads=1, read_sharpness=2.0)
    memory = np.array([[[3e-9, 4e-9, 0], [0, 0, 1], [1, 1, 1]]], np.float32)  # a cell of norm 5e-9 first
    keys = np.array([[[0.6, 0.8, 0]]], np.float32)  # pointing where the tiny cell points
    # Its cosine with the key is 5e-9 / 1e-7 = 0.05, not 1: a tiny cell is almost as weak as an empty one.
    similarity = np.array([0.05, 0, (0.6 + 0.8) / np.sqrt(3)])
    weights = np.exp(2 * similarity) / np.exp(2 * similarity).sum()
    read_value, _ = one_step(cell, memory, keys, np.zeros([1, 3]))
    np.testing.assert_allclose(read_value, [weights @ memory[0]], rtol=1e-5)
    np.testing.assert_allclose(similarity, [cosine(keys[0, 0], m) for m in memory[0]], rtol=1e-5, atol=1e-7)


def test_read_weights_cells_by_softmax_of_cosine_similarity():
    cell = MemoryAugmentedLSTM(units=4, memory_cells=2, cell_size=2, read_heads=2)
    memory = np.array([[[2, 0], [0, 3]]], np.float32)
    # Head 1 points at cell 1 (cosines 1, 0); head 2 halfway between (cosines 1/sqrt(2) each).
    keys = np.array([[[0.5, 0], [0.5, 0.5]]], np.float32)
    weight = np.exp(1) / (np.exp(1) + 1)
    expected_head1 = weight * np.array([2, 0]) + (1 - weight) * np.array([0, 3])
    expected_head2 = 0.5 * np.array([2, 0]) + 0.5 * np.array([0, 3])
    np.testing.assert_allclose(one_step(cell, memory, keys, np.zeros([1, 2]))[0],
                               [np.concatenate([expected_head1, expected_head2])], rtol=1e-6)


def recurrence_case(read_heads, memory_cells, memory, batch=3, steps=7, features=5, units=6, cell_size=4):
    """`(inputs, initial state, weights of a loss)` of a fused loop's test, numpy: 3 episodes of 7 steps, and a loss
    that weighs every output and every final state, so that every gradient path counts. `memory`: "random",
    "tiny cell" (the first cell's norm floored), "empty" or "tiny, then empty"."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=[batch, steps, features]).astype(np.float32)
    state_sizes = [units, units, read_heads * cell_size, memory_cells * cell_size]
    initial_state = [rng.normal(size=[batch, size]).astype(np.float32) for size in state_sizes]
    if memory.startswith("tiny"):
        initial_state[3][:, :cell_size] *= 1e-9
    if memory.endswith("empty"):
        initial_state[3][:, 0 if memory == "empty" else cell_size:] = 0
    output_weights = [rng.normal(size=[batch, steps, units]).astype(np.float32)]
    return inputs, initial_state, output_weights + [rng.normal(size=[batch, size]).astype(np.float32)
                                                    for size in state_sizes]


# Each case compiles for seconds: the fast suite takes two that hold every kind of memory and a split of the
# episodes between them; the whole suite all eight, the layer inside XLA's own compilation too (jit_compile), as
# a user's model compiled so runs it, and the next test a share left empty.
@pytest.mark.parametrize("read_heads, memory_cells, read_sharpness, jit_compile, memory, cores", [
    pytest.param(1, 7, 1.0, False, "random", 1, marks=pytest.mark.slow), (3, 4, 5.0, False, "random", 2),
    pytest.param(3, 4, 5.0, True, "random", 2, marks=pytest.mark.slow),
    pytest.param(0, 7, 1.0, True, "random", 3, marks=pytest.mark.slow),
    pytest.param(2, 7, 3.0, False, "tiny cell", 2, marks=pytest.mark.slow),
    pytest.param(1, 7, 1.0, True, "tiny cell", 5, marks=pytest.mark.slow),
    pytest.param(2, 7, 5.0, False, "empty", 1, marks=pytest.mark.slow), (2, 7, 5.0, False, "tiny, then empty", 1)])
@tensorflow_only
def test_fused_layer_matches_numpy_and_the_cell_loops_automatic_gradients(read_heads, memory_cells, read_sharpness,
                                                                         jit_compile, memory, cores, monkeypatch):
    # 7 steps: with 4 cells old cells drop; 0 heads is the LSTM-only baseline; a tiny cell has its norm floored.
    # The fused layer splits the 3 episodes among the cores: 1 and 2 episodes, or 1 each (5 cores: 3 parts).
    monkeypatch.setattr(tensorflow_fused, "cores_in_use", lambda: cores)
    inputs, initial_state, output_weights = recurrence_case(read_heads, memory_cells, memory)
    batch, units, cell_size = len(inputs), 6, 4
    cell = MemoryAugmentedLSTM(units, memory_cells, cell_size, read_heads, read_sharpness)

    def outputs_and_gradients(rnn_class):
        rnn = rnn_class(cell, return_sequences=True, return_state=True)
        with tf.GradientTape() as tape:
            tape.watch([inputs_tensor, *state_tensors])
            outputs = rnn(inputs_tensor, initial_state=state_tensors)
            loss = sum(tf.reduce_sum(output * weight) for output, weight in zip(outputs, output_weights, strict=True))
        return outputs, tape.gradient(loss, [inputs_tensor, *state_tensors, *cell.trainable_variables])

    inputs_tensor = tf.constant(inputs)
    state_tensors = [tf.constant(state) for state in initial_state]
    automatic = tf.function(lambda: outputs_and_gradients(keras.layers.RNN))()  # the reference: no need of XLA
    fused = tf.function(lambda: outputs_and_gradients(MemoryAugmentedRNN), jit_compile=jit_compile)()
    assert len(automatic[1]) == 5 + 7  # inputs, 4 states, 3 + 2 + 2 weights
    for expected, actual in zip(tf.nest.flatten(automatic), tf.nest.flatten(fused), strict=True):
        # Within 1e-5 of the array's largest entry: through an empty memory's floored norms gradients reach 1e5,
        # and float32 sums of such terms lose the small entries' last digits, in either order of summing.
        scale = max(1.0, float(np.abs(expected).max(initial=0)))
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)
    # The forward pass against the numpy reference too, which shares no code with the cell.
    memory_cells_now = initial_state[3].reshape(batch, memory_cells, cell_size)
    reference = numpy_recurrence(cell, inputs, *initial_state[:3], memory_cells_now)
    for actual, expected in zip(fused[0], reference, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's own path")
@pytest.mark.parametrize("read_heads, memory_cells, read_sharpness, memory", [
    (3, 4, 5.0, "random"), (2, 7, 3.0, "tiny, then empty"), pytest.param(0, 7, 1.0, "random", marks=pytest.mark.slow)])
def test_jax_fused_layer_matches_numpy_and_the_cell_loops_automatic_gradients(read_heads, memory_cells,
                                                                              read_sharpness, memory):
    import jax

    inputs, initial_state, output_weights = recurrence_case(read_heads, memory_cells, memory)
    batch, units, cell_size = len(inputs), 6, 4
    cell = MemoryAugmentedLSTM(units, memory_cells, cell_size, read_heads, read_sharpness)

    def outputs_and_gradients(rnn_class):
        rnn = rnn_class(cell, return_sequences=True, return_state=True)
        rnn(inputs, initial_state=initial_state)
        non_trainable = [variable.value for variable in rnn.non_trainable_variables]

        def loss(trainable, inputs, states):
            outputs, _ = rnn.stateless_call(trainable, non_trainable, inputs, initial_state=states)
            return sum((output * weight).sum() for output, weight in zip(outputs, output_weights, strict=True)), outputs

        (_, outputs), gradients = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            [variable.value for variable in rnn.trainable_variables], inputs, initial_state)
        return outputs, gradients

    automatic, fused = outputs_and_gradients(keras.layers.RNN), outputs_and_gradients(MemoryAugmentedRNN)
    assert backends.fused_kernels() is not None
    for expected, actual in zip(*[jax.tree_util.tree_leaves(result) for result in (automatic, fused)], strict=True):
        # JAX differentiates an empty cell's floored norm to NaN (0 times rsqrt's infinite slope at 0), in the
        # gradient of the initial memory alone; the hand-written pass gives the floor's.
        expected, actual = np.asarray(expected), np.asarray(actual)
        assert np.isfinite(actual).all() and (np.isfinite(expected).all() or memory.endswith("empty"))
        scale = max(1.0, float(np.abs(expected[np.isfinite(expected)]).max(initial=0)))
        np.testing.assert_allclose(actual[np.isfinite(expected)], expected[np.isfinite(expected)], rtol=1e-4,
                                   atol=1e-5 * scale)
    reference = numpy_recurrence(cell, inputs, *initial_state[:3],
                                 initial_state[3].reshape(batch, memory_cells, cell_size))
    for actual, expected in zip(fused[0], reference, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.slow  # compiles for seconds; the fast suite splits a batch in the test above
@tensorflow_only
def test_fused_layer_with_more_cores_than_episodes_of_a_batch_unknown_until_run(monkeypatch):
    # A batch whose size the graph does not know, as fit's last batch: 2 cores and 1 episode leave one share empty.
    monkeypatch.setattr(tensorflow_fused, "cores_in_use", lambda: 2)
    steps, features, units, memory_cells, cell_size = 4, 3, 5, 4, 2
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=[1, steps, features]).astype(np.float32)
    cell = MemoryAugmentedLSTM(units, memory_cells, cell_size, read_heads=1)
    rnn = MemoryAugmentedRNN(cell, return_sequences=True, return_state=True)

    @tf.function(input_signature=[tf.TensorSpec([None, steps, features])])
    def outputs_and_input_gradient(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = rnn(inputs)
        return outputs, tape.gradient(outputs[0], inputs)

    (outputs, *_), gradient = outputs_and_input_gradient(tf.constant(inputs))
    zeros = [np.zeros([1, size], np.float32) for size in cell.state_size]
    np.testing.assert_allclose(outputs, numpy_recurrence(cell, inputs, *zeros[:3],
                                                         zeros[3].reshape(1, memory_cells, cell_size))[0], atol=1e-5)
    assert gradient.shape == inputs.shape and np.all(np.isfinite(gradient))


@pytest.mark.parametrize("threads, graded, loops", [(1000, False, 2), (1000, True, 1)])
@tensorflow_only
def test_the_fused_layer_runs_a_loop_a_usable_core_and_graded_runs_one(threads, graded, loops, monkeypatch):
    # 2 cores: --threads above them would only make loops that take turns on them; graded runs keep one loop
    # whatever the cores, so that their lines do not depend on them.
    monkeypatch.setattr(backends, "usable_cores", lambda: 2)
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: threads)
    fused_steps, episodes_of_each_loop = tensorflow_fused.fused_steps, []

    def counted(cell, deterministic, projected, *state_and_weights):
        episodes_of_each_loop.append(projected.shape[1])
        return fused_steps(cell, deterministic, projected, *state_and_weights)

    monkeypatch.setattr(tensorflow_fused, "fused_steps", counted)
    rnn = MemoryAugmentedRNN(MemoryAugmentedLSTM(units=3, memory_cells=2, cell_size=2, read_heads=1), graded)
    rnn(np.zeros([4, 2, 3], np.float32))
    assert episodes_of_each_loop == [4 // loops] * loops
