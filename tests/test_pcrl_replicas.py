"""PCRL, 1 replica vs 2 (logical CPU) replicas: identical weights, EMA and
queue after two steps (keys gathered before enqueueing; alpha the same on
every replica). Input mixup pairs samples within a replica by design, so it
is off here. Runs in a subprocess: logical devices must be configured
before TensorFlow initialises."""

import json
import os
import sys

from subproc import run_logged

SCRIPT = r'''
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from rr_tf.methods.pcrl import PCRL, Config

cfg = Config(base_width=2, norm="group", queue_size=8, proj_dim=8, gate_hidden=8, momentum=0.9,
             input_mixup=False)
rng = np.random.default_rng(0)
batch = {k: rng.uniform(size=(4, 16, 16, 16, 1)).astype("float32")
         for k in ("view1", "view2", "target1", "target2", "aug_target1", "aug_target2")}
for k in ("aug1", "aug2"):
    batch[k] = np.concatenate([rng.integers(0, 2, (4, 3)), np.eye(4)[rng.integers(0, 4, 4)]],
                              1).astype("float32")

def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        m = PCRL(cfg, seed=3)
        m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=False)
        m.build_for({k: tf.constant(v) for k, v in batch.items()})
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(4).repeat()
    m.fit(ds, steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    return {w.path: w.numpy() for w in m.weights}

one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
diffs = {k: float(np.max(np.abs(one[k] - two[k]))) for k in one}
moved = max(float(np.max(np.abs(v))) for k, v in one.items() if "encoder_ema" in k)
pointer = [v for k, v in two.items() if k.endswith("pointer")][0]
print(json.dumps({"max_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                  "n": len(diffs), "queue_ptr": int(pointer), "ema_max": moved}))
'''


def test_one_vs_two_replicas_give_the_same_weights():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = run_logged([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] > 50 and out["ema_max"] > 0
    assert out["queue_ptr"] == 0  # 2 steps x global batch 4 wrapped around a queue of 8
    assert out["max_diff"] < 1e-4, out  # float32 summation order
