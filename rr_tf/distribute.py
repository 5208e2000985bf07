"""Cross-replica helpers under ``tf.distribute``: what the models, the
pre-training methods and the training tasks all need in a train step
(gather, sum, row offsets, the replica count) and the ``fit`` work-arounds
of :class:`DistributedFitMixin`. The lowest layer of rr_tf beside
``rr_tf.errors``: it imports nothing of rr_tf.

The math is ``keras.ops``; TensorFlow is used only for ``tf.distribute``,
and only when the Keras backend is TensorFlow. Under any other backend the
helpers degrade to their single-device meaning.

* :func:`gather_from_replicas` is ``ReplicaContext.all_gather(x, axis=0)``:
  every replica gets the global batch in replica order. It is differentiable:
  the gradient of a gathered copy flows back to the replica that produced it.
* :func:`sum_over_replicas` is ``all_reduce(SUM)``, also differentiable.
* :func:`replica_row_offset` is where this replica's rows start in the
  gathered batch.
"""

import keras
from keras import ops

try:  # TensorFlow is only needed for tf.distribute
    import tensorflow as tf
except ImportError:  # pragma: no cover - other backends without TF
    tf = None



def _tf_backend():
    return tf is not None and keras.backend.backend() == "tensorflow"


def _replica_context():
    """The replica context of a real (non-default) strategy, else None."""
    if not _tf_backend() or not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_replica_context()  # None in cross-replica context


def num_replicas():
    """``num_replicas_in_sync`` of the current strategy (1 without one)."""
    if not _tf_backend():
        return 1
    return tf.distribute.get_strategy().num_replicas_in_sync


def gather_from_replicas(x):
    """Concatenate ``x`` from all replicas along axis 0 (replica order).

    In replica context of a multi-replica strategy this is
    ``tf.distribute.get_replica_context().all_gather(x, axis=0)``; elsewhere
    (one device, cross-replica context, other backends) it returns ``x``.
    Differentiable. Local batches may differ in size along axis 0.
    """
    ctx = _replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_gather(x, axis=0)


def sum_over_replicas(x):
    """``x`` summed over all replicas (``all_reduce(SUM)``), the same value
    on each; ``x`` itself without distribution. Differentiable: the gradient
    reaching each replica's ``x`` is the sum of all replicas' upstream
    gradients, so a loss computed from global sums and scaled by 1/R per
    replica gets the one-device gradient (tested with the fine-tuning
    loss)."""
    ctx = _replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def replica_row_offset(x):
    """Index of this replica's first row in ``gather_from_replicas(x)``.

    0 without distribution. Exact even when the local batches differ in size
    (the sizes are gathered and those of the lower replica ids summed).
    """
    ctx = _replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return ops.convert_to_tensor(0, "int32")
    size = tf.shape(x, out_type=tf.int32)[:1]
    sizes = ctx.all_gather(size, axis=0)  # [R]
    rid = ctx.replica_id_in_sync_group
    below = tf.range(ctx.num_replicas_in_sync) < tf.cast(rid, tf.int32)
    return tf.reduce_sum(tf.where(below, sizes, tf.zeros_like(sizes)))


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


class DistributedFitMixin:
    """For the keras.Models rr_tf trains with ``fit`` (pre-training methods,
    the segmentation tasks): works around two Keras 3.15 defects under
    MultiWorkerMirroredStrategy (minimal repro and details in docs/gpu.md):

    - ``fit`` first builds the model from one batch, made a single tensor
      with ``strategy.reduce("MEAN", batch)``, which TF 2.21's collective
      reduce refuses for a dict ("Attempt to convert a value ({'box1':
      PerReplica...}) with an unsupported type (<class 'dict'>) to a
      Tensor"). Only the shapes matter there, so the first local replica's
      part of the batch is taken instead (no cross-worker traffic).
    - the train step's logs are averaged over workers with
      ``strategy.reduce("MEAN", value, axis=0)``, which fails for the scalar
      a train step returns ("Invalid reduction dimension 0 for input with 0
      dimensions"); :meth:`replica_logs` gives them a length-1 axis there,
      which that reduction averages away again.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            for _, _, it in iterator:
                batch = next(it)
                break
            else:  # an empty epoch: nothing to build from
                return None
            local = self._distribute_strategy.experimental_local_results
            data_batch = tf.nest.map_structure(
                lambda v: local(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v,
                batch)
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @staticmethod
    def replica_logs(logs):
        """A train step's ``{name: scalar}`` logs as Keras must receive them
        from a replica (unchanged except under MultiWorkerMirroredStrategy)."""
        if tf.distribute.has_strategy() and is_multi_worker(tf.distribute.get_strategy()):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs
