"""Token masking drawn over the *global* batch, shared by RepRec and MAE-3D.

MAE masks by sorting uniform noise per sample (``argsort``: the first ``K``
tokens of the shuffled order stay visible). Under tf.distribute each replica
sees only its slice of the batch, so drawing the noise per replica would make
the masks depend on how the batch is split. Here the noise is drawn
statelessly from ``(seed, step)`` for the whole global batch and every replica
keeps its own rows: 1 or N replicas mask every sample the same way.
"""

import tensorflow as tf

from rr_tf.models import rng
from rr_tf.distribute import gather_from_replicas, replica_row_offset
from rr_tf.models.vit3d import num_visible


def global_uniform(local_batch, seed, step, dtype=tf.float32):
    """This replica's rows of ``stateless_uniform([global batch, ...], (seed,
    step))``, shaped like ``local_batch``: a per-sample draw that does not
    depend on how the batch is split over replicas (each replica draws the
    whole global batch and keeps its rows)."""
    local = tf.shape(local_batch)[0]
    total = tf.shape(gather_from_replicas(tf.zeros([local, 1])))[0]
    start = replica_row_offset(local_batch)
    shape = tf.concat([[total], tf.shape(local_batch)[1:]], 0)
    draw = rng.uniform(shape, [seed, step], dtype=dtype)
    return draw[start:start + local]


def global_random_masking(local_batch, num_tokens, mask_ratio, seed, step):
    """MAE random masking of this replica's rows of the global batch.

    Args:
      local_batch: any tensor whose axis 0 is this replica's batch (only its
        batch size and replica position are used).
      num_tokens: ``N`` tokens per sample (a Python int).
      mask_ratio: fraction of tokens masked; ``K = num_visible(N, ratio)``
        stay visible, exactly, in every sample.
      seed, step: ints or int32 scalars; the noise is
        ``stateless_uniform([global batch, N], (seed, step))``.

    Returns:
      ``(token_mask [b, N] float32 with 1 = masked, ids_keep [b, K],
      ids_restore [b, N])`` as :func:`rr_tf.models.vit3d.random_masking`.
    """
    n = int(num_tokens)
    local = tf.shape(local_batch)[0]
    total = tf.shape(gather_from_replicas(tf.zeros([local, 1])))[0]
    start = replica_row_offset(local_batch)
    noise = rng.uniform([total, n], [seed, step])
    noise = noise[start:start + local]
    ids_shuffle = tf.argsort(noise, axis=1, stable=True)
    ids_restore = tf.argsort(ids_shuffle, axis=1, stable=True)
    keep = num_visible(n, mask_ratio)
    ids_keep = ids_shuffle[:, :keep]
    token_mask = tf.cast(tf.gather(tf.concat([tf.zeros([local, keep]),
                                              tf.ones([local, n - keep])], 1),
                                   ids_restore, batch_dims=1), tf.float32)
    return token_mask, ids_keep, ids_restore
