"""rr_tf.models.rng: the train steps' random draws are the same bits in a
plain graph and under XLA (TensorFlow's stateless ops are not), and they
behave like random numbers."""

import numpy as np
import tensorflow as tf

from rr_tf.models import rng


def _draws(step):
    seed = tf.stack([tf.constant(7), step])
    return (rng.uniform([3, 500], seed), rng.uniform_int([400], seed, 0, 5),
            rng.normal([300], seed), rng.fold_in(seed, 3), rng.bits([4], [0, step]))


def test_plain_graph_and_xla_draw_the_same_numbers():
    step = tf.constant(3)
    plain = tf.function(_draws)(step)
    xla = tf.function(_draws, jit_compile=True)(step)
    for a, b in zip(plain[:2] + plain[3:], xla[:2] + xla[3:]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(plain[2].numpy(), xla[2].numpy(), atol=1e-5)  # log/cos ulps
    eager = _draws(step)
    np.testing.assert_array_equal(eager[0].numpy(), plain[0].numpy())
    # TensorFlow's own op, Philox pinned, does not agree with itself under XLA (why rng exists)
    tf_draw = lambda s: tf.random.stateless_uniform([64], tf.stack([0, s]), alg="philox")
    assert not np.array_equal(tf.function(tf_draw)(step).numpy(),
                              tf.function(tf_draw, jit_compile=True)(step).numpy())


def test_hash_by_hand():
    """lowbias32 of small words, computed here with Python integers."""
    def ref(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    words = [0, 1, 2, 12345, 0xFFFFFFFF, 0x80000000, 0xDEADBEEF]
    got = rng.mix32(tf.constant(words, tf.int64)).numpy().tolist()
    assert got == [ref(w) for w in words]


def test_statistics_and_seed_dependence():
    u = rng.uniform([200_000], [1, 2]).numpy()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    assert hist.min() > 0.95 * len(u) / 20 and hist.max() < 1.05 * len(u) / 20
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    w = rng.bits([100_000], [3, 4]).numpy()
    ones = np.array([((w >> k) & 1).mean() for k in range(32)])
    assert np.all(np.abs(ones - 0.5) < 0.01), ones  # every bit balanced
    n = rng.normal([200_000], [5, 6]).numpy()
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1.0) < 0.01
    k = rng.uniform_int([100_000], [7, 8], 2, 7).numpy()
    assert set(np.unique(k)) == {2, 3, 4, 5, 6}
    assert np.all(np.abs(np.bincount(k)[2:] / len(k) - 0.2) < 0.01)
    # other seeds, steps or folds give unrelated streams; the same seed the same one
    a, b = rng.uniform([10_000], [1, 2]).numpy(), rng.uniform([10_000], [1, 3]).numpy()
    c = rng.uniform([10_000], rng.fold_in([1, 2], 1)).numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03 and abs(np.corrcoef(a, c)[0, 1]) < 0.03
    np.testing.assert_array_equal(a, rng.uniform([10_000], [1, 2]).numpy())
    assert rng.fold_in([1, 2], 1).dtype == tf.int32
