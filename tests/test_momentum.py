"""EMA helper, MomentumEncoder, Queue and their behaviour under MirroredStrategy."""

import os
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.models import momentum as M
from subproc import run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(units=4, name=None):
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(units),
         keras.layers.BatchNormalization(), keras.layers.Dense(2)],
        name=name,
    )


def _perturb(model, seed):
    """Random weights and BN statistics different from the initial ones."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("f") + 1.0)
    # a training-mode pass moves the moving statistics too
    model(rng.normal(size=(5, 3)).astype("f"), training=True)


def _values(model):
    return [w.numpy().copy() for w in model.weights]


# ---------------------------------------------------------------------------
# ema_update / copy_weights


def test_ema_formula_trainable_and_bn_stats():
    target, online = _net(), _net()
    _perturb(target, 0)
    _perturb(online, 1)
    t0, o0 = _values(target), _values(online)
    names = [w.path.split("/")[-1] for w in target.weights]
    assert "moving_mean" in names and "moving_variance" in names
    M.ema_update(target, online, 0.9)
    for w, a, b in zip(target.weights, t0, o0):
        np.testing.assert_allclose(w.numpy(), 0.9 * a + 0.1 * b, rtol=1e-6)
    # online untouched
    for w, b in zip(online.weights, o0):
        np.testing.assert_array_equal(w.numpy(), b)


def test_ema_inside_tf_function_with_tensor_momentum():
    target, online = _net(), _net()
    _perturb(online, 2)
    t0, o0 = _values(target), _values(online)

    @tf.function
    def step(m):
        M.ema_update(target, online, m)

    step(tf.constant(0.75))
    step(tf.constant(0.75))
    for w, a, b in zip(target.weights, t0, o0):
        ref = 0.75 * (0.75 * a + 0.25 * b) + 0.25 * b
        np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_m0_and_copy_weights_copy():
    target, online = _net(), _net()
    _perturb(target, 3)
    _perturb(online, 4)
    M.ema_update(target, online, 0.0)
    for a, b in zip(_values(target), _values(online)):
        np.testing.assert_array_equal(a, b)
    _perturb(online, 5)
    M.copy_weights(target, online)
    for a, b in zip(_values(target), _values(online)):
        np.testing.assert_array_equal(a, b)


def test_structure_mismatch_raises():
    with pytest.raises(ValueError, match="structures differ"):
        M.ema_update(_net(4), _net(5), 0.9)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="6 weights|structures differ"):
        M.ema_update(other, _net(4), 0.9)
    with pytest.raises(ValueError, match="sync"):
        M.ema_update(_net(), _net(), 0.9, sync="bogus")


def test_order_does_not_depend_on_trainable_flag():
    target, online = _net(), _net()
    target.trainable = False
    _perturb(online, 6)
    M.copy_weights(target, online)
    for a, b in zip(_values(target), _values(online)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# MomentumEncoder


class _SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=False):
        return self.bn(self.dense(x), training=training)


def test_momentum_encoder_clone_copy_and_no_gradients():
    online = _net()
    _perturb(online, 7)
    enc = M.MomentumEncoder(online, momentum=0.9)
    assert enc.target is not online
    for a, b in zip(_values(enc.target), _values(online)):
        np.testing.assert_array_equal(a, b)
    assert enc.trainable_variables == [] and enc.trainable_weights == []
    assert len(enc.non_trainable_weights) == len(online.weights)

    # a model holding both: only the online weights are trainable
    x = keras.Input((3,))
    both = keras.Model(x, [online(x), enc(x)])
    ids = {id(v) for v in both.trainable_variables}
    assert ids == {id(v) for v in online.trainable_variables}
    assert not ids & {id(v) for v in enc.target.weights}
    both.trainable = True  # a parent cannot make the target trainable
    assert enc.trainable_variables == []

    # one optimizer step through both branches leaves the target unchanged
    before = _values(enc.target)
    opt = keras.optimizers.SGD(0.1)
    data = np.random.default_rng(0).normal(size=(4, 3)).astype("f")
    with tf.GradientTape() as tape:
        a, b = both(data, training=True)
        loss = tf.reduce_sum(a * tf.stop_gradient(b)) + tf.reduce_sum(b)
    grads = tape.gradient(loss, both.trainable_variables)
    opt.apply_gradients(zip(grads, both.trainable_variables))
    # only moving statistics may change (training-mode BN); trainable never
    for w, v in zip(enc.target.weights, before):
        if "moving" not in w.path:
            np.testing.assert_array_equal(w.numpy(), v)

    # update follows the formula
    t0, o0 = _values(enc.target), _values(online)
    enc.update()
    for w, a, b in zip(enc.target.weights, t0, o0):
        np.testing.assert_allclose(w.numpy(), 0.9 * a + 0.1 * b, rtol=1e-6)
    t0 = _values(enc.target)
    enc.update(0.5)
    for w, a, b in zip(enc.target.weights, t0, o0):
        np.testing.assert_allclose(w.numpy(), 0.5 * a + 0.5 * b, rtol=1e-6)


def test_momentum_encoder_subclassed_and_keras_roundtrip(tmp_path):
    sub = _SubclassedNet()
    sub(np.zeros((1, 3), "f"))
    enc = M.MomentumEncoder(sub, momentum=0.99)
    assert len(enc.target.weights) == len(sub.weights) == 6

    online = _net()
    _perturb(online, 8)
    enc = M.MomentumEncoder(online, momentum=0.99)
    x = keras.Input((3,))
    model = keras.Model(x, enc(x))
    path = str(tmp_path / "enc.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    data = np.ones((2, 3), "f")
    np.testing.assert_allclose(loaded(data), model(data), rtol=1e-6)
    enc2 = loaded.layers[-1]
    assert isinstance(enc2, M.MomentumEncoder) and enc2.momentum == 0.99
    assert enc2.trainable_variables == []
    with pytest.raises(ValueError, match="attach"):
        enc2.update()
    enc2.attach(online)
    enc2.update(0.0)
    for a, b in zip(_values(enc2.target), _values(online)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Queue


def test_queue_init_seeded_unit_rows():
    q1, q2, q3 = M.Queue(7, 4, seed=1), M.Queue(7, 4, seed=1), M.Queue(7, 4)
    v = q1.values().numpy()
    assert v.shape == (7, 4) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(v, q2.values().numpy())
    assert not np.allclose(v, q3.values().numpy())
    assert int(q1.pointer.numpy()) == 0
    assert q1.trainable_variables == [] and len(q1.non_trainable_weights) == 2


def _unit(i, d=3):
    v = np.zeros(d, np.float32)
    v[i % d] = i + 1.0  # not unit length: enqueue normalises
    return v


def test_queue_fifo_wraparound_exact_contents():
    q = M.Queue(5, 3, seed=0)
    init = q.values().numpy()
    batches = [np.stack([_unit(i), _unit(i + 1)]) for i in (0, 2, 4, 6)]
    expect = init.copy()
    ptr = 0
    for b in batches:
        q.enqueue(b)
        for row in b:
            expect[ptr] = row / np.linalg.norm(row)
            ptr = (ptr + 1) % 5
        np.testing.assert_allclose(q.values().numpy(), expect, atol=1e-7)
        assert int(q.pointer.numpy()) == ptr
    # after keys 0..7 into 5 slots: pointer 3; slots hold keys 5, 6, 7, 3, 4
    # (key i points along axis i % 3)
    assert ptr == 3
    e = np.eye(3)
    np.testing.assert_allclose(q.values().numpy(),
                               e[[2, 0, 1, 0, 1]], atol=1e-7)


def test_queue_enqueue_in_tf_function_and_oversized_batch():
    q = M.Queue(4, 2, seed=0, normalize=False)

    @tf.function
    def push(k):
        q.enqueue(k)

    keys = np.arange(12, dtype=np.float32).reshape(6, 2)  # 6 keys > 4 slots
    push(keys)
    # last 4 keys written at 0..3, pointer (0 + 4) % 4 = 0
    np.testing.assert_array_equal(q.values().numpy(), keys[2:])
    assert int(q.pointer.numpy()) == 0
    push(keys[:3])
    np.testing.assert_array_equal(q.values().numpy()[:3], keys[:3])
    np.testing.assert_array_equal(q.values().numpy()[3], keys[5])
    assert int(q.pointer.numpy()) == 3


def test_queue_checkpoint_roundtrip(tmp_path):
    q = M.Queue(6, 3, seed=2)
    q.enqueue(np.eye(3, dtype=np.float32))
    ckpt = tf.train.Checkpoint(queue=q)
    path = ckpt.save(str(tmp_path / "ckpt"))
    saved_keys, saved_ptr = q.values().numpy().copy(), int(q.pointer.numpy())
    q.enqueue(np.ones((4, 3), np.float32))
    assert int(q.pointer.numpy()) != saved_ptr

    fresh = M.Queue(6, 3, seed=99)
    tf.train.Checkpoint(queue=fresh).restore(path).assert_consumed()
    np.testing.assert_array_equal(fresh.values().numpy(), saved_keys)
    assert int(fresh.pointer.numpy()) == saved_ptr == 3
    # resume continues at the same place
    fresh.enqueue(np.array([[0.0, 0.0, 2.0]], np.float32))
    assert int(fresh.pointer.numpy()) == 4
    np.testing.assert_array_equal(fresh.values().numpy()[3], [0, 0, 1])


def test_queue_config_roundtrip():
    q = M.Queue(8, 4, seed=5, normalize=False, name="negatives")
    cfg = q.get_config()
    q2 = M.Queue.from_config(cfg)
    assert (q2.size, q2.dim, q2.seed, q2.normalize) == (8, 4, 5, False)
    np.testing.assert_array_equal(q2.values().numpy(), q.values().numpy())
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(q))
    assert isinstance(restored, M.Queue) and restored.name == "negatives"


def test_batch_statistics_frozen_bn_normalises_by_the_batch_and_keeps_moving_stats():
    online = _net()
    online(np.zeros((1, 3), "f"))
    _perturb(online, 1)
    online.layers[1].moving_variance.assign(np.abs(online.layers[1].moving_variance.numpy()))
    enc = M.MomentumEncoder(online, momentum=0.9)
    bn = enc.target.layers[1]
    moving = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    x = np.random.default_rng(2).normal(size=(6, 3)).astype("f")
    d1, d2 = enc.target.layers[0], enc.target.layers[2]
    h = x @ d1.kernel.numpy() + d1.bias.numpy()
    mu, var = h.mean(0), h.var(0)  # biased batch variance, as BatchNorm
    ref = ((h - mu) / np.sqrt(var + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy())
    ref = ref @ d2.kernel.numpy() + d2.bias.numpy()
    np.testing.assert_allclose(enc(x, batch_stats=True).numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tf.function(lambda v: enc(v, batch_stats=True))(x).numpy(), ref,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), moving[1])
    # the switch is closed again: frozen, inference-mode by default and with training=True
    assert not bn.trainable and bn.momentum == 0.99 and enc.trainable_weights == []
    inference = ((h - moving[0]) / np.sqrt(moving[1] + bn.epsilon) * bn.gamma.numpy()
                 + bn.beta.numpy()) @ d2.kernel.numpy() + d2.bias.numpy()
    np.testing.assert_allclose(enc(x, training=True).numpy(), inference, rtol=1e-4, atol=1e-5)


def _centre(g):
    return g - tf.reduce_mean(g, axis=0, keepdims=True)


def test_shuffled_group_apply_partitions_the_batch_at_random():
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 1)).astype("f"))
    out = M.shuffled_group_apply(_centre, x, 2, tf.constant([1, 2])).numpy()
    # out_i = x_i - mean(group of i): recover the groups from the means
    means = np.round(x.numpy()[:, 0] - out[:, 0], 5)
    groups = [np.flatnonzero(means == v) for v in np.unique(means)]
    assert sorted(len(g) for g in groups) == [4, 4]
    for g in groups:
        np.testing.assert_allclose(x.numpy()[g].mean(), means[g[0]], atol=1e-5)
    again = M.shuffled_group_apply(_centre, x, 2, tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(out, again)  # a function of the seed
    others = {tuple(np.round(x.numpy()[:, 0] - M.shuffled_group_apply(
        _centre, x, 2, tf.constant([s, 2])).numpy()[:, 0], 4)) for s in range(6)}
    assert len(others) > 1  # other seeds, other groups
    with pytest.raises(ValueError, match="groups"):
        M.shuffled_group_apply(_centre, x, 3, tf.constant([1, 2]))


def test_momentum_keys_groups_seed_and_no_gradient():
    """The one key pass of MoCo, RepRec, PCRL, multitask and PGL: 0 groups
    -> one moving-statistics call, gradient stopped; G groups -> shuffled
    groups drawn from (seed + offset, optimizer step), nested outputs kept."""
    from rr_tf.methods.contrastive import KEY_SEED_OFFSET, momentum_keys

    class Method:
        seed, optimizer = 5, None

    x = tf.constant(np.random.default_rng(1).normal(size=(8, 1)).astype("f"))
    calls = []

    def encode(v, batch_stats):
        calls.append(batch_stats)
        return {"centred": _centre(v), "pair": [v, 2.0 * v]}

    with tf.GradientTape() as tape:
        tape.watch(x)
        plain = momentum_keys(Method, encode, x, 0)
        total = tf.reduce_sum(plain["pair"][1])
    assert calls == [False] and tape.gradient(total, x) is None
    np.testing.assert_allclose(plain["pair"][1], 2.0 * x.numpy())
    calls.clear()
    grouped = momentum_keys(Method, encode, x, 2)
    assert calls == [True, True]  # one call per group
    expected = M.shuffled_group_apply(_centre, x, 2, tf.constant([5 + KEY_SEED_OFFSET, 0]))
    np.testing.assert_allclose(grouped["centred"], expected, atol=1e-6)
    np.testing.assert_allclose(grouped["pair"][0], x, atol=1e-6)  # back in the input order


def test_helpers_without_strategy_are_identity():
    x = tf.ones((3, 2))
    assert M.gather_from_replicas(x) is x
    assert int(M.replica_row_offset(x)) == 0
    assert M.num_replicas() == 1


# ---------------------------------------------------------------------------
# Two replicas (2 logical CPU devices, in a fresh interpreter)

_TWO_REPLICAS = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from rr_tf import losses as L
    from rr_tf.models import momentum as M

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2

    def per_replica(fn):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: fn(ctx.replica_id_in_sync_group))

    def comps(v):
        v = v.value if isinstance(v, keras.Variable) else v
        return [c.numpy() for c in v.values]

    # --- queue: both replicas write the gathered global batch -------------
    with strategy.scope():
        q = M.Queue(6, 2, seed=0, normalize=False)
    init = q.values().numpy()
    local = [np.array([[1, 2], [3, 4]], "f"), np.array([[5, 6], [7, 8]], "f")]

    @tf.function
    def push(k):
        strategy.run(q.enqueue, args=(k,))

    push(per_replica(lambda r: tf.constant(local[r])))
    push(per_replica(lambda r: tf.constant(local[r]) + 10))
    glob = np.concatenate(local)  # replica order
    # 8 keys into 6 slots: ptr 0 -> rows 0..3 = glob; ptr 4 -> rows 4,5,0,1
    ref = init.copy()
    for i, row in enumerate(np.concatenate([glob, glob + 10])):
        ref[i % 6] = row
    for c in comps(q.keys):
        np.testing.assert_array_equal(c, ref)
    assert [int(c) for c in comps(q.pointer)] == [2, 2]
    print("QUEUE_OK")

    # --- ema_update in replica context -------------------------------------
    def net():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                 keras.layers.BatchNormalization()])
    with strategy.scope():
        online, target = net(), net()
    rng = np.random.default_rng(0)
    for w in online.weights:
        w.assign(rng.normal(size=w.shape).astype("f"))

    # a training-mode pass moves each replica's BN statistics differently
    @tf.function
    def forward(x):
        strategy.run(lambda x: online(x, training=True), args=(x,))
    forward(per_replica(lambda r: tf.fill((4, 3), 3.0 * tf.cast(r, tf.float32))))
    mm = comps(online.layers[1].moving_mean)
    assert not np.allclose(mm[0], mm[1]), "replicas should have drifted"

    t0 = [comps(w) for w in target.weights]
    o0 = [comps(w) for w in online.weights]

    @tf.function
    def ema(m):
        strategy.run(lambda: M.ema_update(target, online, m))
    ema(tf.constant(0.9))
    for w, tc, oc, ow in zip(target.weights, t0, o0, online.weights):
        c = comps(w)
        np.testing.assert_array_equal(c[0], c[1])  # identical on replicas
        o_ref = oc[0] if ow.trainable else (oc[0] + oc[1]) / 2
        np.testing.assert_allclose(c[0], 0.9 * tc[0] + 0.1 * o_ref,
                                   rtol=1e-6, atol=1e-7)
    # MomentumEncoder.update inside strategy.run with a copy (m = 0)
    with strategy.scope():
        enc = M.MomentumEncoder(online, momentum=0.0, sync="none")
    @tf.function
    def upd():
        strategy.run(enc.update)
    upd()
    for w, ow in zip(enc.target.weights, online.weights):
        for a, b in zip(comps(w), comps(ow)):
            np.testing.assert_array_equal(a, b)
    print("EMA_OK")

    # --- nt_xent_global on 2 replicas == single-device nt_xent -------------
    z1 = rng.normal(size=(6, 5)).astype("f")
    z2 = rng.normal(size=(6, 5)).astype("f")
    sizes = [2, 4]  # uneven local batches: offsets come from the gather
    starts = [0, 2]
    w = tf.constant(rng.normal(size=(5, 5)).astype("f"))  # a shared "model"
    with tf.GradientTape() as tape:
        tape.watch(w)
        ref_loss, _ = L.nt_xent(z1 @ w, z2 @ w, 0.1)
    ref_grad = tape.gradient(ref_loss, w).numpy()

    def replica_fn(a, b):
        with tf.GradientTape() as tape:
            tape.watch(w)
            pa, pb = a @ w, b @ w
            all_a = M.gather_from_replicas(pa)
            all_b = M.gather_from_replicas(pb)
            off = M.replica_row_offset(pa)
            loss, _ = L.nt_xent_global(pa, pb, all_a, all_b, off, 0.1)
            n_local = tf.cast(2 * tf.shape(pa)[0], tf.float32)
            # weight by rows so the sum is the global mean (uneven batches)
            scaled = loss * n_local / tf.cast(2 * tf.shape(all_a)[0], tf.float32)
        return scaled, tape.gradient(scaled, w), off

    @tf.function
    def run(a, b):
        return strategy.run(replica_fn, args=(a, b))
    da = per_replica(lambda r: tf.constant(z1)[starts[r]:starts[r] + sizes[r]])
    db = per_replica(lambda r: tf.constant(z2)[starts[r]:starts[r] + sizes[r]])
    losses, grads, offs = run(da, db)
    total = sum(float(x) for x in strategy.experimental_local_results(losses))
    assert abs(total - float(ref_loss)) < 1e-5 * max(1, abs(total)), (total, ref_loss)
    g = sum(x.numpy() for x in strategy.experimental_local_results(grads))
    np.testing.assert_allclose(g, ref_grad, rtol=1e-4, atol=1e-5)
    assert [int(x) for x in strategy.experimental_local_results(offs)] == [0, 2]
    print("NTXENT_OK")

    # --- shuffled groups: 2 replicas x 1 group == 1 device x 2 groups ------
    xs = rng.normal(size=(8, 3)).astype("f")
    seed = tf.constant([5, 9])
    centre = lambda g: g - tf.reduce_mean(g, axis=0, keepdims=True)
    ref = M.shuffled_group_apply(centre, tf.constant(xs), 2, seed).numpy()
    out = tf.function(lambda d: strategy.run(
        lambda v: M.shuffled_group_apply(centre, v, 2, seed), args=(d,)))(
        per_replica(lambda r: tf.constant(xs)[4 * r:4 * r + 4]))
    got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    print("SHUFFLE_OK")

    # --- batch statistics of a sync_batch target: global with synchronized=True
    def sync_net():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                 keras.layers.BatchNormalization(synchronized=True)])
    with strategy.scope():
        sync_online = sync_net()
        sync_enc = M.MomentumEncoder(sync_online, momentum=0.9)
    whole = sync_enc(tf.constant(xs), batch_stats=True).numpy()  # one device, all 8 rows

    def split(sync):
        out = tf.function(lambda d: strategy.run(
            lambda v: sync_enc(v, batch_stats=True, synchronized=sync), args=(d,)))(
            per_replica(lambda r: tf.constant(xs)[4 * r:4 * r + 4]))
        return np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    np.testing.assert_allclose(split(True), whole, rtol=1e-4, atol=1e-5)
    assert not np.allclose(split(False), whole, rtol=1e-3, atol=1e-4)  # per-replica statistics
    assert sync_enc.target.layers[1].synchronized  # the switch restored it
    print("SYNC_TARGET_OK")
    """
)


def test_two_replica_mirrored_strategy():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    proc = run_logged(
        [sys.executable, "-c", _TWO_REPLICAS], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for tag in ("QUEUE_OK", "EMA_OK", "NTXENT_OK", "SHUFFLE_OK", "SYNC_TARGET_OK"):
        assert tag in proc.stdout, out[-4000:]
