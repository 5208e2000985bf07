"""Self-supervised and segmentation losses (keras.ops only, float32 math).

Every function casts its inputs to float32 first, so callers running under a
``mixed_float16`` / ``mixed_bfloat16`` policy can pass half-precision
activations directly. All functions are backend-agnostic (``keras.ops``);
anything that needs ``tf.distribute`` (gathering across replicas, the row
offset of this replica) lives in :mod:`rr_tf.distribute`.

Contrastive losses return ``(loss, logits)`` where ``logits[:, 0]`` is the
positive and the remaining columns are negatives, so
:func:`contrastive_accuracy` works the same for MoCo and SimCLR.

Distribution note (see docs/design.md): these functions return the mean over
the rows they are given. Under ``tf.distribute`` a custom ``train_step``
divides that per-replica loss by ``num_replicas_in_sync`` before taking
gradients, because the optimizer sums gradients across replicas.
"""

from keras import ops

__all__ = [
    "l2_normalize",
    "info_nce",
    "nt_xent",
    "nt_xent_global",
    "simsiam_loss",
    "simsiam_symmetric_loss",
    "masked_mse",
    "per_token_layernorm",
    "soft_dice_loss",
    "dice_ce_loss",
    "contrastive_accuracy",
    "embedding_std",
]

_F32 = "float32"


def _f32(x):
    return ops.cast(x, _F32)


def l2_normalize(x, axis=-1, eps=1e-12):
    """``x / max(||x||, eps)`` along ``axis`` in float32 (as torch F.normalize)."""
    x = _f32(x)
    sq = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(sq, eps * eps))


def _cross_entropy_first(logits):
    """Mean over rows of cross-entropy with the target class at index 0."""
    return ops.mean(ops.logsumexp(logits, axis=-1) - logits[:, 0])


# ---------------------------------------------------------------------------
# MoCo v2 InfoNCE


def info_nce(q, k, queue=None, temperature=0.2):
    """MoCo v2 InfoNCE of queries against keys and a queue of negatives.

    Args:
      q: ``[B, d]`` queries (online branch); L2-normalised here.
      k: ``[B, d]`` keys (momentum branch); L2-normalised here and treated as
        constants (``stop_gradient``).
      queue: ``[K, d]`` negatives, already L2-normalised (e.g.
        ``Queue.values()``); treated as constants. ``None`` means no negatives:
        the logits are the positive column only and the loss is 0 (in-batch
        negatives are :func:`nt_xent`'s job, not this function's).
      temperature: tau.

    Returns:
      ``(loss, logits)``: loss = mean over the batch of the cross-entropy with
      the positive at index 0; logits ``[B, 1 + K]`` (already divided by tau).
    """
    q = l2_normalize(q)
    k = ops.stop_gradient(l2_normalize(k))
    pos = ops.sum(q * k, axis=-1, keepdims=True)  # [B, 1]
    if queue is None:
        logits = pos
    else:
        negatives = ops.stop_gradient(_f32(queue))
        neg = ops.matmul(q, ops.transpose(negatives))  # [B, K]
        logits = ops.concatenate([pos, neg], axis=-1)
    logits = logits / temperature
    return _cross_entropy_first(logits), logits


# ---------------------------------------------------------------------------
# SimCLR NT-Xent


def _skip_two(k, a, b):
    """Map ``k`` in ``[0, n-2)`` onto ``[0, n)`` skipping ``a < b`` (per row)."""
    return (
        k
        + ops.cast(k >= a, k.dtype)
        + ops.cast(k >= b - 1, k.dtype)
    )


def nt_xent_global(z1_local, z2_local, z1_all, z2_all, replica_offset=0,
                   temperature=0.1):
    """NT-Xent for this replica's rows against the global batch.

    The global batch has ``2N`` views: rows ``0..N-1`` are ``z1_all`` and rows
    ``N..2N-1`` are ``z2_all``. Each view's positive is its pair; its
    negatives are the other ``2N - 2`` views. This function computes the loss
    of the local anchors only (``z1_local``, ``z2_local``, ``b`` rows each,
    which sit at rows ``replica_offset .. replica_offset + b - 1`` of
    ``z1_all`` / ``z2_all``) against all ``2N`` columns.

    How a caller uses it under ``tf.distribute`` (inside ``strategy.run``)::

        from rr_tf.distribute import gather_from_replicas, replica_row_offset
        z1_all = gather_from_replicas(z1)        # differentiable all_gather
        z2_all = gather_from_replicas(z2)
        offset = replica_row_offset(z1)          # rows before this replica
        loss, logits = nt_xent_global(z1, z2, z1_all, z2_all, offset, tau)
        loss = loss / strategy.num_replicas_in_sync   # optimizer sums grads

    With equal local batches the mean of the replicas' losses equals the
    single-device :func:`nt_xent` on the concatenated batch, and because
    ``all_gather`` back-propagates the gradient of the gathered copies to the
    replica that produced them, the summed gradients equal the single-device
    gradients too (tested).

    Returns:
      ``(loss, logits)``: mean over the ``2b`` local anchors (order: the ``z1``
      anchors then the ``z2`` anchors) of the cross-entropy; logits
      ``[2b, 2N - 1]`` with the positive at column 0 and the ``2N - 2``
      negatives after it (self-similarity removed), divided by tau.
    """
    a = l2_normalize(ops.concatenate([z1_local, z2_local], axis=0))  # [2b, d]
    cols = l2_normalize(ops.concatenate([z1_all, z2_all], axis=0))  # [2N, d]
    sim = ops.matmul(a, ops.transpose(cols)) / temperature  # [2b, 2N]

    b = ops.shape(z1_local)[0]
    n = ops.shape(z1_all)[0]
    rows = ops.arange(b, dtype="int32") + ops.cast(replica_offset, "int32")
    n32 = ops.cast(n, "int32")
    self_idx = ops.concatenate([rows, rows + n32], axis=0)  # [2b]
    pos_idx = ops.concatenate([rows + n32, rows], axis=0)  # [2b]

    pos = ops.take_along_axis(sim, pos_idx[:, None], axis=1)  # [2b, 1]
    lo = ops.minimum(self_idx, pos_idx)[:, None]
    hi = ops.maximum(self_idx, pos_idx)[:, None]
    k = ops.arange(2 * n32 - 2, dtype="int32")[None, :]
    neg_idx = _skip_two(k, lo, hi)  # [2b, 2N-2]
    neg = ops.take_along_axis(sim, neg_idx, axis=1)
    logits = ops.concatenate([pos, neg], axis=1)
    return _cross_entropy_first(logits), logits


def nt_xent(z1, z2, temperature=0.1, local_rows=None):
    """SimCLR NT-Xent (symmetric) over the batch ``[z1; z2]`` of ``2B`` views.

    ``z1``, ``z2``: ``[B, d]`` projections of the two views (normalised here).
    ``local_rows``: optional ``(z1_local, z2_local, replica_offset)``; when
    given, ``z1``/``z2`` are the *global* (gathered) batch and only the local
    rows are anchors (same as :func:`nt_xent_global`).

    Returns ``(loss, logits)``; logits ``[2B, 2B - 1]``, positive at column 0.
    """
    if local_rows is not None:
        z1_local, z2_local, offset = local_rows
        return nt_xent_global(z1_local, z2_local, z1, z2, offset, temperature)
    return nt_xent_global(z1, z2, z1, z2, 0, temperature)


# ---------------------------------------------------------------------------
# SimSiam


def simsiam_loss(p, z):
    """Negative cosine similarity ``-mean_b cos(p_b, sg(z_b))`` (in [-1, 1])."""
    p = l2_normalize(p)
    z = ops.stop_gradient(l2_normalize(z))
    return -ops.mean(ops.sum(p * z, axis=-1))


def simsiam_symmetric_loss(p1, p2, z1, z2):
    """``0.5 * (D(p1, z2) + D(p2, z1))`` as in SimSiam / PCRLv2."""
    return 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1))


# ---------------------------------------------------------------------------
# Masked reconstruction


def masked_mse(pred, target, token_mask):
    """MSE over masked tokens only (MAE convention).

    Args:
      pred, target: ``[B, N, C]``; ``target`` is treated as a constant.
      token_mask: ``[B, N]``, 1 = masked (counted), 0 = visible (ignored).

    Returns:
      Scalar: per-token mean over channels, then the mask-weighted mean over
      tokens. 0 (no NaN, zero gradient) when no token is masked.
    """
    pred = _f32(pred)
    target = ops.stop_gradient(_f32(target))
    m = _f32(token_mask)
    per_token = ops.mean(ops.square(pred - target), axis=-1)  # [B, N]
    num = ops.sum(per_token * m)
    den = ops.sum(m)
    return num / ops.maximum(den, 1e-6)


def per_token_layernorm(x, eps=1e-6):
    """Normalise each token's features over the last axis (no affine).

    ``(x - mean) / sqrt(var + eps)`` with the biased variance (LayerNorm
    convention), in float32: the RepRec / MAE ``norm_pix_loss`` target.
    """
    x = _f32(x)
    mean = ops.mean(x, axis=-1, keepdims=True)
    var = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * ops.rsqrt(var + eps)


# ---------------------------------------------------------------------------
# Segmentation


def _labels_int(labels, logits):
    labels = ops.convert_to_tensor(labels)
    if len(labels.shape) == len(logits.shape):  # trailing channel of 1
        labels = ops.squeeze(labels, axis=-1)
    return ops.cast(labels, "int32")


def _identity(x):
    return x


def soft_dice_loss(logits, labels, num_classes, smooth=1e-5,
                   include_background=True, reduce_sums=_identity):
    """``1 - mean_c dice_c`` of softmax probabilities, per class over the batch.

    ``dice_c = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth)``
    with sums over all batch and spatial voxels; a class absent from both the
    prediction and the labels scores 1. ``include_background=False`` drops
    class 0 from the mean. ``reduce_sums`` is applied to the per-class sums
    before the ratio: under tf.distribute pass
    :func:`rr_tf.distribute.sum_over_replicas` so that the batch is the
    global one (as nnU-Net's DDP batch Dice), not each replica's share.
    """
    logits = _f32(logits)
    labels = _labels_int(labels, logits)
    probs = ops.softmax(logits, axis=-1)
    onehot = ops.one_hot(labels, num_classes, dtype=_F32)
    axes = tuple(range(len(logits.shape) - 1))
    sums = reduce_sums(ops.stack([ops.sum(probs * onehot, axis=axes),
                                  ops.sum(probs, axis=axes) + ops.sum(onehot, axis=axes)]))
    dice = (2.0 * sums[0] + smooth) / (sums[1] + smooth)  # [C]
    if not include_background:
        dice = dice[1:]
    return 1.0 - ops.mean(dice)


def dice_ce_loss(logits, labels, num_classes, class_weights=None, smooth=1e-5,
                 include_background=True, dice_weight=1.0, ce_weight=1.0,
                 reduce_sums=_identity, replicas=1):
    """Soft Dice + cross-entropy for ``logits [B, D, H, W, C]``, ``labels [B, D, H, W]``.

    Dice: :func:`soft_dice_loss`. Cross-entropy: mean over voxels; with
    ``class_weights`` (length C) it is the weighted mean
    ``sum(w[y] * ce) / sum(w[y])`` (torch ``CrossEntropyLoss(weight=...)``).
    Labels may carry a trailing channel of 1.

    Under tf.distribute with ``reduce_sums = sum_over_replicas`` and
    ``replicas = R``, every term is of the *global* batch and the value is
    the same on every replica; the caller's 1/R loss scaling then gives the
    one-device gradient (local batches must be equal in size).
    """
    logits = _f32(logits)
    labels = _labels_int(labels, logits)
    dice = soft_dice_loss(logits, labels, num_classes, smooth,
                          include_background, reduce_sums)
    logp = ops.log_softmax(logits, axis=-1)
    onehot = ops.one_hot(labels, num_classes, dtype=_F32)
    ce = -ops.sum(onehot * logp, axis=-1)  # per voxel
    if class_weights is None:
        ce = reduce_sums(ops.mean(ce)) / replicas
    else:
        w = ops.sum(onehot * ops.convert_to_tensor(class_weights, _F32),
                    axis=-1)
        sums = reduce_sums(ops.stack([ops.sum(w * ce), ops.sum(w)]))
        ce = sums[0] / ops.maximum(sums[1], 1e-12)
    return dice_weight * dice + ce_weight * ce


# ---------------------------------------------------------------------------
# Monitors


def contrastive_accuracy(logits):
    """Top-1 accuracy of the positive at column 0 (ties count as correct)."""
    logits = _f32(logits)
    hit = ops.argmax(logits, axis=-1) == 0
    return ops.mean(ops.cast(hit, _F32))


def embedding_std(z):
    """Collapse monitor: mean over dims of the batch std of L2-normalised ``z``.

    About ``1 / sqrt(d)`` for healthy, spread-out embeddings; 0 when every
    sample maps to the same direction (SimSiam paper, Fig. 2).
    """
    z = l2_normalize(z)
    return ops.mean(ops.std(z, axis=0))

