"""What the pre-training method tests share: random batches of views, a
method built at tiny size (compiled, every variable created), the tiny
config of each method from its demo flagfile, and RepRec's tiny setting
(used beyond test_reprec.py: MICLe, mixed precision)."""

import contextlib
import dataclasses
import os
import time

import tensorflow as tf

from rr_tf.optim import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def uniform_views(keys, b, shape, seed=0, generator=None):
    """{key: uniform [b, *shape, 1] float32}, drawn in the order of ``keys``
    from ``generator`` or a new one seeded with ``seed``."""
    g = generator or tf.random.Generator.from_seed(seed)
    return {k: g.uniform((b,) + tuple(shape) + (1,)) for k in keys}


def build_method(cls, config, batch, seed=3, optimizer=("adamw", 1e-3, 100)):
    """``cls(config, seed=seed)`` compiled with ``build_optimizer(*optimizer)``
    (no XLA) and built from ``batch``: ready for ``train_step``."""
    m = cls(config, seed=seed)
    m.compile(optimizer=build_optimizer(*optimizer), jit_compile=False)
    m.build_for(batch)
    return m


def demo_config(name, **tiny):
    """(cls, Config, crop) of method ``name`` as its demo flagfile sets it,
    shrunk for tests: base width 2, queue 8, one BatchNorm group of keys
    (batch 2), and the fields in ``tiny``; each only where the Config has
    it. The crop is 32 x 32 x (the demo's slices for the sequential 2D
    method, else 32)."""
    from launch.flagutil import flagfile_config
    from rr_tf.methods import get_method

    cls = get_method(name)
    demo = "demo.flags" if name == "reprec" else f"demo_{name}.flags"
    values, crop = flagfile_config(os.path.join(ROOT, "configs", demo), cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for field, value in dict(dict(base_width=2, queue_size=8, key_bn_groups=1), **tiny).items():
        if field in fields:
            values[field] = value
    crop = (32, 32, crop[2] if crop[2] < 16 else 32)  # multitask: X, Y, slices
    return cls, cls.Config(**values), crop


def _reprec_tiny():
    from rr_tf.methods.reprec import Config

    return Config(base_width=2, queue_size=8, proj_dim=8, transformer_dim=16, transformer_depth=1,
                  transformer_heads=2, decoder_dim=8, decoder_depth=1, mask_ratio=0.5,
                  key_bn_groups=1)  # batch 2: one group (the head's BatchNorm needs 2+)


REPREC_TINY = _reprec_tiny()


def reprec_batch(b=2, shape=(32, 32, 32), seed=0):
    """A RepRec batch: two views."""
    return uniform_views(("view1", "view2"), b, shape, seed)


# ------------------------------------------------------------ gradient flow
@contextlib.contextmanager
def watching(variables, persistent=True):
    """A GradientTape that watches the values of ``variables`` (EMA copies,
    queues: non-trainable, so only a watched tape can show that no gradient
    reaches them)."""
    with tf.GradientTape(persistent=persistent) as tape:
        tape.watch([w.value for w in variables])
        yield tape


def assert_constants(variables, grads):
    """Each of ``variables`` got no gradient or an all-zero one (``grads``:
    theirs, in order): a constant of the loss."""
    for w, g in zip(variables, grads):
        assert g is None or float(tf.reduce_max(tf.abs(g))) == 0.0, w.path


def assert_all_reached(variables, grads):
    """Each of ``variables`` got a non-zero gradient."""
    for v, g in zip(variables, grads):
        assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0, v.path


# ------------------------------------------------------------ data and CLI runs
def phantom_shards(out, num_cases, shape, spacing, val_fraction=0.0, **prepare_args):
    """Phantom shards of ``num_cases`` cases of array ``shape`` at ``spacing``
    mm in folder ``out`` (one worker, quiet); returns prepare's result."""
    from rr_tf.data.prepare import PrepareConfig, prepare
    from rr_tf.data.spec import PreprocessSpec

    return prepare(PrepareConfig(source="phantom", output_dir=str(out), num_cases=num_cases,
                                 phantom_shape=tuple(shape),
                                 spec=PreprocessSpec(spacing=tuple(spacing)), workers=1,
                                 progress=False, val_fraction=val_fraction, **prepare_args),
                   log=lambda m: None)


def wait_for_checkpoint(proc, run_dir, step, seconds):
    """Waits until the running pre-training ``proc`` has written checkpoint
    ``step`` in ``run_dir`` (fails if it exits first or ``seconds`` pass)."""
    deadline = time.time() + seconds
    while not (run_dir / "checkpoints" / f"ckpt-{step}.index").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"no checkpoint within {seconds} s"
        time.sleep(0.2)
