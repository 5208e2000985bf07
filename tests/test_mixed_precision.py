"""RepRec under mixed precision: the convolutions and attention run in the
low-precision dtype, while losses, the queue, the EMA copies and the
variables stay float32; float16 uses loss scaling (and needs a GPU)."""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.methods.reprec import RepRec
from rr_tf.training.optim import build_optimizer
from rr_tf.training.strategy import set_precision

from test_reprec import TINY, _batch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def policy():
    yield set_precision
    set_precision("none")


def test_reprec_trains_in_bfloat16_with_float32_state():
    """In a fresh process with oneDNN off (its bfloat16 Conv3D weight
    gradients are NaN on AVX512-BF16 CPUs: refused, see the next test)."""
    import subprocess
    import sys

    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    res = subprocess.run([sys.executable, "-c", "import test_mixed_precision as t; t._bf16_run()"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "bf16 ok" in res.stdout, res.stderr[-3000:]


def test_bfloat16_is_refused_where_onednn_gives_nan_gradients(policy):
    from rr_tf.training.strategy import onednn_bf16_unsafe

    flags = "flags\t: fpu avx512f avx512_bf16 avx512_vnni\n"
    assert onednn_bf16_unsafe(flags, {}) and onednn_bf16_unsafe(flags, {"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert not onednn_bf16_unsafe(flags, {"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert not onednn_bf16_unsafe("flags\t: fpu avx2 avx512f\n", {})
    if onednn_bf16_unsafe() and not tf.config.list_logical_devices("GPU"):  # this machine
        with pytest.raises(ConfigError, match="TF_ENABLE_ONEDNN_OPTS=0"):
            policy("bfloat16")


def _bf16_run():
    set_precision("bfloat16")
    m = RepRec(TINY, seed=3)
    m.compile(optimizer=build_optimizer("adamw", 1e-3, 100, mixed_precision="bfloat16"),
              jit_compile=False)
    m.build_for(_batch())
    # compute in bfloat16, variables in float32
    assert m.encoder.cnn.dtype_policy.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in m.weights if v.dtype.startswith("float"))
    assert m.encoder.cnn.encode(_batch()["view1"])[-1].dtype == tf.bfloat16
    assert m.queue.values().dtype == tf.float32

    q0 = m.queue.values().numpy().copy()
    w0 = [v.numpy().copy() for v in m.encoder.trainable_weights]
    for step in range(2):
        logs = m.train_step(_batch(seed=step))
    for name in ("loss", "loss_contrast", "loss_recover", "embedding_std"):
        assert logs[name].dtype == tf.float32 and np.isfinite(float(logs[name])), name
    # float32 InfoNCE over 1 + 8 logits: near ln 9 at the start
    assert 0.5 < float(logs["loss_contrast"]) < 2 * np.log(TINY.queue_size + 1)
    q = m.queue.values().numpy()
    assert q.dtype == np.float32 and not np.allclose(q[:4], q0[:4])
    np.testing.assert_allclose(np.linalg.norm(q[:4], axis=1), 1.0, rtol=1e-3)
    moved = [not np.array_equal(a, v.numpy()) for a, v in zip(w0, m.encoder.trainable_weights)]
    assert sum(moved) > 0.9 * len(moved)
    assert all(np.isfinite(v.numpy()).all() for v in m.weights)
    print("bf16 ok")


def test_float16_is_refused_without_a_gpu(policy):
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        policy("float16")


def test_loss_scaling_is_undone_before_the_update():
    """The float16 optimizer scales the loss; the applied step must equal
    the unscaled one (plain SGD, float32 compute so it runs on CPU)."""
    cfg = dataclasses.replace(TINY, mask_fill="zeros")
    results, start = [], None
    for scaled in (False, True):
        m = RepRec(cfg, seed=3)
        opt = build_optimizer("sgd", 0.01, 100, mixed_precision="float16" if scaled else "none")
        m.compile(optimizer=opt, jit_compile=False)
        m.build_for(_batch())
        if start is None:
            start = [v.numpy() for v in m.weights]
        else:  # the same starting point
            for v, value in zip(m.weights, start):
                v.assign(value)
            assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
            assert float(m.optimizer.scale_loss(tf.constant(1.0))) > 1000
        before = [v.numpy() for v in m.encoder.trainable_weights]
        m.train_step(_batch(seed=5))
        results.append([v.numpy() for v in m.encoder.trainable_weights])
    assert sum(not np.allclose(a, b) for a, b in zip(results[1], before)) > len(before) // 2
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
