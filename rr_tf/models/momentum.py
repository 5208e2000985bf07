"""Momentum (EMA) encoder and negative-key queue.

The math is ``keras.ops``; TensorFlow is used only for ``tf.distribute``
(writing mirrored variables), and only when the Keras backend is TensorFlow.
The cross-replica helpers (gather, sum, row offset) live in
:mod:`rr_tf.distribute` and are re-exported here.

Behaviour under ``tf.distribute.MirroredStrategy`` (called inside
``strategy.run``, i.e. in replica context):

* :func:`ema_update` computes ``m * t + (1 - m) * o`` on every replica from its
  own (device-local) copies. Online *trainable* weights are identical on all
  replicas (the optimizer applies the same summed gradient), but Keras 3
  updates BatchNorm moving statistics per replica from the local batch, so
  they drift apart. By default (``sync="non_trainable"``) the new values of
  the pairs whose online variable is not trainable are averaged across
  replicas with one packed all-reduce, so the target ends up identical on
  every replica; ``sync="all"`` averages every pair, ``sync="none"`` none.
  The write goes through ``merge_call`` + ``strategy.extended.update``, which
  assigns each device's component its own value; it works whatever the
  variables' ``aggregation`` is (Keras creates them with ``NONE``).
* :class:`Queue` gathers the keys of all replicas first, so every replica
  writes the same global batch at the same place and advances the same
  pointer; the write uses the same per-device update as the EMA.

Called outside ``strategy.run`` (cross-replica context, e.g. initialisation
under ``strategy.scope()``), the values are computed once and broadcast to
every device by ``variable.assign``.
"""

import contextlib

import numpy as np

import keras
from keras import ops


try:  # TensorFlow is only needed for tf.distribute
    import tensorflow as tf
except ImportError:  # pragma: no cover - other backends without TF
    tf = None

from rr_tf.distribute import (  # noqa: F401  (re-exported)
    _replica_context, _tf_backend, gather_from_replicas, num_replicas, replica_row_offset,
    sum_over_replicas)

__all__ = [
    "gather_from_replicas",
    "replica_row_offset",
    "num_replicas",
    "paired_weights",
    "ema_update",
    "copy_weights",
    "batch_statistics",
    "shuffled_group_apply",
    "MomentumEncoder",
    "Queue",
]


def _raw(variable):
    """The backend variable behind a Keras variable (tf.Variable on TF)."""
    if isinstance(variable, keras.Variable) and _tf_backend():
        # ``.value`` would be a cast tensor inside an autocast scope
        raw = getattr(variable, "_value", None)
        return raw if isinstance(raw, tf.Variable) else variable.value
    return variable


def _assign_all(variables, values):
    """Assign ``values[i]`` to ``variables[i]`` on every replica.

    In replica context each device's copy receives the value computed on that
    device (``merge_call`` + ``extended.update``); the values must therefore
    already be identical across replicas when identical copies are wanted.
    """
    variables = list(variables)
    values = [ops.cast(v, var.dtype) for var, v in zip(variables, values)]
    ctx = _replica_context()
    if ctx is None:
        for var, val in zip(variables, values):
            var.assign(val)
        return

    def merge_fn(strategy, vals):
        for var, val in zip(variables, vals):
            strategy.extended.update(
                _raw(var), lambda v, x: v.assign(x), args=(val,), group=False
            )

    ctx.merge_call(merge_fn, args=(values,))


# ---------------------------------------------------------------------------
# EMA


def _weights_of(model):
    if isinstance(model, (list, tuple)):
        return list(model)
    return list(model.weights)


def paired_weights(target, online):
    """``[(t, o), ...]`` for two layers/models of identical structure.

    Pairs all weights (trainable and non-trainable, e.g. BatchNorm moving
    statistics; not seed-generator state) in tracking order, which does not
    depend on the ``trainable`` flag. Lists of variables are accepted too.
    Raises ``ValueError`` naming the first difference when the number of
    weights, a name, a shape or a dtype differs.
    """
    tw, ow = _weights_of(target), _weights_of(online)
    if len(tw) != len(ow):
        raise ValueError(
            "Momentum target and online structures differ: target has "
            f"{len(tw)} weights, online has {len(ow)}. Build both (call them "
            "once on a sample input) from the same architecture."
        )
    for i, (t, o) in enumerate(zip(tw, ow)):
        if (
            tuple(t.shape) != tuple(o.shape)
            or t.name != o.name
            or str(t.dtype) != str(o.dtype)
        ):
            raise ValueError(
                "Momentum target and online structures differ at weight "
                f"{i}: target '{t.path}' {tuple(t.shape)} {t.dtype} vs online "
                f"'{o.path}' {tuple(o.shape)} {o.dtype}."
            )
    return list(zip(tw, ow))


def _is_float(v):
    return "float" in str(v.dtype)


def ema_update(target, online, momentum, sync="non_trainable"):
    """``t = m * t + (1 - m) * o`` for every weight pair (float32 math).

    Args:
      target, online: layers/models (or lists of variables) of identical
        structure; see :func:`paired_weights`.
      momentum: float or scalar tensor ``m`` (0 copies ``online``).
      sync: under a multi-replica strategy in replica context, which pairs
        have their new value averaged across replicas before writing:
        ``"non_trainable"`` (default: pairs whose online variable is not
        trainable, e.g. BatchNorm moving statistics that Keras updates per
        replica), ``"all"`` or ``"none"``. Ignored elsewhere.

    Non-float weights (if any) are copied. Safe inside ``tf.function`` and
    inside ``strategy.run``; see the module docstring.
    """
    if sync not in ("non_trainable", "all", "none"):
        raise ValueError(f"sync must be non_trainable|all|none, got {sync!r}")
    pairs = paired_weights(target, online)
    m = ops.cast(momentum, "float32")
    new = []
    for t, o in pairs:
        if _is_float(t):
            t32 = ops.cast(ops.convert_to_tensor(t), "float32")
            o32 = ops.cast(ops.convert_to_tensor(o), "float32")
            new.append(m * t32 + (1.0 - m) * o32)
        else:
            new.append(ops.convert_to_tensor(o))

    ctx = _replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1 and sync != "none":
        idx = [
            i for i, (t, o) in enumerate(pairs)
            if _is_float(t) and (sync == "all" or not o.trainable)
        ]
        if idx:
            reduced = ctx.all_reduce(
                tf.distribute.ReduceOp.MEAN, [new[i] for i in idx]
            )
            for i, r in zip(idx, reduced):
                new[i] = r
    _assign_all([t for t, _ in pairs], new)


def copy_weights(target, online):
    """Initialise ``target`` as an exact copy of ``online`` (``m = 0``)."""
    ema_update(target, online, 0.0)


# ---------------------------------------------------------------------------
# Key-encoder BatchNorm (MoCo's "shuffling BN")


@contextlib.contextmanager
def batch_statistics(layer, synchronized=False):
    """While open, the BatchNorm layers inside ``layer`` normalise a call made
    with ``training=True`` by the statistics of the batch they see, even
    when frozen, and leave their moving statistics unchanged.

    Keras runs a frozen BatchNorm in inference mode whatever ``training``
    says (moving statistics); MoCo's key encoder instead normalises each key
    batch by its own statistics. The switch acts when ``layer`` is called
    (traced); the layers' variables keep ``trainable=False`` so no gradient
    tape watches them. The moving statistics are rewritten with themselves
    (momentum 1: ``m * 1 + batch * 0``) and so stay exactly as they were.
    Synchronised BatchNorm layers use the statistics of the local batch
    only (the caller chooses the groups: :func:`shuffled_group_apply`),
    unless ``synchronized``: then they keep their own setting (a
    ``sync_batch`` layer normalises by the global batch, as RepRec's
    recovery targets under ``--norm=sync_batch``).
    """
    norms = [l for l in layer._flatten_layers(include_self=True, recursive=True)
             if isinstance(l, keras.layers.BatchNormalization)]
    saved = [(l._trainable, l.momentum, l.synchronized) for l in norms]
    try:
        for l in norms:
            l._trainable = True
            l.momentum = 1.0
            l.synchronized = l.synchronized and synchronized
        yield
    finally:
        for l, (trainable, momentum, synchronized) in zip(norms, saved):
            l._trainable = trainable
            l.momentum = momentum
            l.synchronized = synchronized


def shuffled_group_apply(fn, x, groups, seed):
    """``fn`` applied to ``groups`` random groups of the *global* batch.

    MoCo's shuffling BN: the key batch is shuffled across GPUs so that the
    BatchNorm statistics of a key never come from the same set of samples as
    those of its query (otherwise the model can find its positive through the
    batch statistics instead of the content). Here the global batch (all
    replicas, gathered) is permuted by ``argsort`` of
    ``stateless_uniform(seed)``, cut into ``groups`` equal groups, replica
    ``r`` runs ``fn`` on groups ``r * G / R ... (r + 1) * G / R - 1`` one
    group per call (so BatchNorm sees one group), the outputs are gathered,
    put back in the original order, and this replica's rows are returned.
    One replica with ``groups = 2`` and two replicas with ``groups = 2`` give
    the same keys. ``groups`` must divide the global batch and be a multiple
    of the replica count; the local batches must be equal. No gradient flows
    through the result.

    Args:
      fn: maps a ``[n, ...]`` tensor to a tensor or a nested structure of
        ``[n, ...]`` tensors (e.g. the key encoder under
        :func:`batch_statistics`); the result has the same structure.
      x: this replica's batch.
      groups: number of BatchNorm groups over the global batch.
      seed: int32 ``[2]`` stateless seed, the same on every replica.
    """
    replicas = num_replicas()
    if groups < 1 or groups % replicas:
        raise ValueError(f"key BatchNorm groups ({groups}) must be a multiple of the replica "
                         f"count ({replicas}).")
    everything = gather_from_replicas(ops.stop_gradient(x))
    total = tf.shape(everything)[0]
    if isinstance(x.shape[0], int):  # static: check now, with a readable message
        if (x.shape[0] * replicas) % groups:
            raise ValueError(f"key BatchNorm groups ({groups}) must divide the global batch "
                             f"({x.shape[0] * replicas}).")
    else:
        tf.debugging.assert_equal(total % groups, 0, message="key BatchNorm groups must "
                                  "divide the global batch")
    from rr_tf.models import rng  # portable draws: the same compiled by XLA or not

    perm = tf.argsort(rng.uniform([total], seed), stable=True)
    inverse = tf.argsort(perm, stable=True)
    share = total // replicas
    ctx = _replica_context()
    rid = 0 if ctx is None else ctx.replica_id_in_sync_group
    mine = tf.gather(everything, perm[rid * share:(rid + 1) * share])
    size = total // groups
    parts = [fn(mine[i * size:(i + 1) * size]) for i in range(groups // replicas)]
    start = replica_row_offset(x)
    local = tf.shape(x)[0]

    def reassemble(*pieces):  # this replica's rows, in the original order
        out = tf.gather(gather_from_replicas(ops.concatenate(pieces, axis=0)), inverse)
        return ops.stop_gradient(out[start:start + local])

    return tf.nest.map_structure(reassemble, *parts)


# ---------------------------------------------------------------------------
# Momentum encoder


def _clone(online, sample_input=None):
    functional = isinstance(online, keras.Model) and (
        isinstance(online, keras.Sequential)
        or getattr(online, "_is_graph_network", False)
        or type(online).__name__ == "Functional"
    )
    if functional:
        target = keras.models.clone_model(online)
    else:
        target = online.__class__.from_config(online.get_config())
        build_config = online.get_build_config()
        if sample_input is not None:
            target(sample_input)
        elif build_config:
            target.build_from_config(build_config)
    if sample_input is not None and not target.built:
        target(sample_input)
    return target


class _Ref:
    """Holds an object without Keras/TF attribute tracking."""

    def __init__(self, obj):
        self.obj = obj


@keras.saving.register_keras_serializable(package="rr_tf")
class MomentumEncoder(keras.layers.Layer):
    """A frozen copy of an online network that follows it by EMA.

    ``MomentumEncoder(online, momentum=0.999)`` clones ``online``
    (``keras.models.clone_model`` for Functional/Sequential models, else
    ``from_config(get_config())`` + ``build_from_config``; pass
    ``sample_input`` when the online layer cannot be rebuilt from its build
    config), copies its weights, and marks every target weight
    non-trainable: they never appear in ``trainable_variables`` of this layer
    or of a model holding it, so the optimizer and the tape ignore them, but
    they are tracked, so checkpoints and ``.keras`` files include them.

    ``update(momentum=None)`` applies :func:`ema_update` (MoCo calls it once
    per step, before computing the keys). ``call(x, training=False)`` runs
    the target; ``call(x, batch_stats=True)`` runs it with its BatchNorm
    layers normalising by the statistics of ``x`` (see
    :func:`batch_statistics`; the moving statistics stay as they are;
    ``synchronized=True`` keeps synchronised layers global). The online
    network is referenced, not tracked (it belongs to
    the caller); after deserialisation ``attach(online)`` reconnects it.
    """

    def __init__(self, online=None, momentum=0.999, target=None,
                 sample_input=None, sync="non_trainable", **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(trainable=False, **kwargs)
        if target is None:
            if online is None:
                raise ValueError("MomentumEncoder needs `online` or `target`.")
            target = _clone(online, sample_input)
        elif isinstance(target, dict):
            target = keras.saving.deserialize_keras_object(target)
        self.momentum = float(momentum)
        self.sync = sync
        self.target = target
        self.target.trainable = False
        self._online = _Ref(None)
        if online is not None:
            self.attach(online)
            copy_weights(self.target, online)
        self.built = True

    # The target is never trainable, whatever a parent model sets.
    @property
    def trainable(self):
        return False

    @trainable.setter
    def trainable(self, value):
        keras.layers.Layer.trainable.fset(self, False)

    @property
    def online(self):
        return self._online.obj

    def attach(self, online):
        """Set the online network followed by :meth:`update` (checks shapes)."""
        paired_weights(self.target, online)
        self._online = _Ref(online)

    def update(self, momentum=None):
        if self.online is None:
            raise ValueError("MomentumEncoder.update: call attach(online) first.")
        m = self.momentum if momentum is None else momentum
        ema_update(self.target, self.online, m, sync=self.sync)

    def call(self, inputs, training=False, batch_stats=False, synchronized=False):
        if not batch_stats:
            return self.target(inputs, training=training)
        with batch_statistics(self.target, synchronized=synchronized):
            return self.target(inputs, training=True)

    def get_config(self):
        config = super().get_config()
        config.pop("trainable", None)
        config.update({
            "momentum": self.momentum,
            "sync": self.sync,
            "target": keras.saving.serialize_keras_object(self.target),
        })
        return config


# ---------------------------------------------------------------------------
# Queue


def _random_unit_rows(size, dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, dim)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@keras.saving.register_keras_serializable(package="rr_tf")
class Queue(keras.layers.Layer):
    """FIFO queue of ``size`` negative keys of dimension ``dim`` (MoCo).

    Two non-trainable weights, both saved by ``tf.train.Checkpoint``, model
    checkpoints and ``.keras`` files: ``keys`` ``(size, dim)`` float32,
    initialised with seeded random unit vectors, and ``pointer`` (int64
    scalar, the next row to write).

    ``enqueue(keys)`` L2-normalises the keys (``normalize=True``), gathers
    them from all replicas (replica order), writes them at
    ``pointer, pointer + 1, ...`` modulo ``size`` (wrap-around handled, so
    ``size`` need not be a multiple of the batch; if a batch is larger than
    the queue only its last ``size`` keys are kept) and advances the pointer.
    Gradients never flow into the queue. ``values()`` / ``call()`` return the
    current keys.
    """

    def __init__(self, size, dim, seed=0, normalize=True, **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(trainable=False, **kwargs)
        self.size = int(size)
        self.dim = int(dim)
        self.seed = int(seed)
        self.normalize = bool(normalize)
        init = _random_unit_rows(self.size, self.dim, self.seed)
        self.keys = self.add_weight(
            shape=(self.size, self.dim),
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(
                init, "float32"),
            dtype="float32", trainable=False, autocast=False, name="keys",
        )
        self.pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int64", trainable=False,
            autocast=False, name="pointer",
        )
        self.built = True

    def values(self):
        return ops.convert_to_tensor(self.keys)

    def call(self, inputs=None):
        return self.values()

    def enqueue(self, keys):
        """Write ``keys`` ``[b, dim]`` (all replicas' under tf.distribute)."""
        keys = ops.stop_gradient(ops.cast(keys, "float32"))
        if self.normalize:
            sq = ops.sum(ops.square(keys), axis=-1, keepdims=True)
            keys = keys * ops.rsqrt(ops.maximum(sq, 1e-24))
        keys = gather_from_replicas(keys)
        keys = keys[-self.size:]  # a batch larger than the queue
        n = ops.shape(keys)[0]
        ptr = ops.convert_to_tensor(self.pointer)
        rows = (ptr + ops.arange(n, dtype="int64")) % self.size
        new_keys = ops.scatter_update(
            ops.convert_to_tensor(self.keys), rows[:, None], keys
        )
        new_ptr = (ptr + ops.cast(n, "int64")) % self.size
        _assign_all([self.keys, self.pointer], [new_keys, new_ptr])

    def get_config(self):
        config = super().get_config()
        config.pop("trainable", None)
        config.update({"size": self.size, "dim": self.dim, "seed": self.seed,
                       "normalize": self.normalize})
        return config
