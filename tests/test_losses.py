"""rr_tf.losses against small numpy references written out here."""

import numpy as np
import pytest
import tensorflow as tf

from rr_tf import losses as L


def _np_norm(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce0(logits):
    """Cross-entropy with the target at column 0, mean over rows."""
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - logits[:, 0]))


def _np(x):
    return np.asarray(x)


# ---------------------------------------------------------------------------
# InfoNCE


def test_info_nce_hand_case():
    q = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    k = np.array([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
    queue = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    tau = 0.5
    loss, logits = L.info_nce(q, k, queue, temperature=tau)
    # by hand: q_n = e1, e2; k_n = (1,1,0)/sqrt2, e2
    s = 1 / np.sqrt(2)
    ref_logits = np.array([[s, 0.0, 1.0], [1.0, 0.0, 0.0]]) / tau
    np.testing.assert_allclose(_np(logits), ref_logits, atol=1e-6)
    row0 = np.log(np.exp(2 * s) + 1 + np.exp(2.0)) - 2 * s
    row1 = np.log(np.exp(2.0) + 2) - 2.0
    assert float(loss) == pytest.approx((row0 + row1) / 2, abs=1e-5)
    assert logits.shape == (2, 3)


def test_info_nce_random_matches_numpy_and_no_queue():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    queue = _np_norm(rng.normal(size=(6, 8)))
    loss, logits = L.info_nce(q.astype("f"), k.astype("f"), queue.astype("f"))
    qn, kn = _np_norm(q), _np_norm(k)
    ref = np.concatenate([(qn * kn).sum(1, keepdims=True), qn @ queue.T], 1)
    ref = ref / 0.2
    np.testing.assert_allclose(_np(logits), ref, rtol=1e-5, atol=1e-5)
    assert float(loss) == pytest.approx(_np_ce0(ref), rel=1e-5)
    loss0, logits0 = L.info_nce(q, k, None)
    assert logits0.shape == (4, 1) and float(loss0) == pytest.approx(0.0)


def test_info_nce_gradients_only_to_q():
    rng = np.random.default_rng(1)
    q = tf.Variable(rng.normal(size=(3, 4)).astype("f"))
    k = tf.Variable(rng.normal(size=(3, 4)).astype("f"))
    queue = tf.Variable(_np_norm(rng.normal(size=(5, 4))).astype("f"))
    with tf.GradientTape(persistent=True) as tape:
        loss, _ = L.info_nce(q, k, queue)
    gq, gk, gqueue = tape.gradient(loss, [q, k, queue])
    assert gq is not None and np.abs(gq.numpy()).max() > 1e-4
    for g in (gk, gqueue):
        assert g is None or np.abs(g.numpy()).max() == 0.0


# ---------------------------------------------------------------------------
# NT-Xent


def _np_nt_xent(z1, z2, tau):
    z = _np_norm(np.concatenate([z1, z2]))
    n = len(z1)
    sim = z @ z.T / tau
    rows = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        neg = [sim[i, j] for j in range(2 * n) if j not in (i, pos)]
        rows.append([sim[i, pos]] + neg)
    rows = np.array(rows)
    return _np_ce0(rows), rows


def test_nt_xent_matches_numpy():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    loss, logits = L.nt_xent(z1.astype("f"), z2.astype("f"), temperature=0.1)
    ref_loss, ref_logits = _np_nt_xent(z1, z2, 0.1)
    assert logits.shape == (6, 5)
    # same positive column and the same negatives in the same column order
    np.testing.assert_allclose(_np(logits), ref_logits, rtol=1e-4, atol=1e-4)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)


def test_nt_xent_hand_case_b2():
    # B=2, d=2: views e1,e2 | e1,-e2 ; tau=1
    z1 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    z2 = np.array([[1.0, 0.0], [0.0, -1.0]], np.float32)
    loss, logits = L.nt_xent(z1, z2, temperature=1.0)
    # anchor 0 (e1): pos z2[0]=e1 -> 1; negs z1[1]=e2 -> 0, z2[1]=-e2 -> 0
    # anchor 1 (e2): pos -e2 -> -1; negs e1 -> 0, e1 -> 0
    ref = np.array([[1, 0, 0], [-1, 0, 0], [1, 0, 0], [-1, 0, 0]], float)
    np.testing.assert_allclose(_np(logits), ref, atol=1e-6)
    expect = 0.5 * (np.log(np.e + 2) - 1) + 0.5 * (np.log(np.exp(-1) + 2) + 1)
    assert float(loss) == pytest.approx(expect, abs=1e-5)


@pytest.mark.parametrize("sizes", [(2, 2), (1, 3)])
def test_nt_xent_global_equals_single_device(sizes):
    rng = np.random.default_rng(3)
    n = sum(sizes)
    z1 = rng.normal(size=(n, 4)).astype("f")
    z2 = rng.normal(size=(n, 4)).astype("f")
    full_loss, full_logits = L.nt_xent(z1, z2, temperature=0.1)
    full_logits = _np(full_logits)
    total, off = 0.0, 0
    for b in sizes:
        sl = slice(off, off + b)
        loss, logits = L.nt_xent_global(z1[sl], z2[sl], z1, z2, off, 0.1)
        loss2, _ = L.nt_xent(z1, z2, 0.1, local_rows=(z1[sl], z2[sl], off))
        assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
        # local rows: z1 anchors then z2 anchors, same as the global rows
        rows = list(range(off, off + b)) + list(range(n + off, n + off + b))
        np.testing.assert_allclose(_np(logits), full_logits[rows], rtol=1e-5)
        total += float(loss) * 2 * b
        off += b
    assert total / (2 * n) == pytest.approx(float(full_loss), rel=1e-5)


# ---------------------------------------------------------------------------
# SimSiam


def test_simsiam_hand_case_and_symmetric():
    p = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    z = np.array([[2.0, 2.0], [0.0, -3.0]], np.float32)
    # cosines: 1/sqrt2 and -1
    expect = -(1 / np.sqrt(2) - 1.0) / 2
    assert float(L.simsiam_loss(p, z)) == pytest.approx(expect, abs=1e-6)
    assert float(L.simsiam_loss(p, p)) == pytest.approx(-1.0, abs=1e-6)
    p2 = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    z2 = np.array([[0.0, 5.0], [1.0, 0.0]], np.float32)
    sym = L.simsiam_symmetric_loss(p, p2, z, z2)
    # D(p, z2): cosines 0, 0 -> 0 ; D(p2, z): cosines 1/sqrt2, 0
    assert float(L.simsiam_loss(p, z2)) == pytest.approx(0.0, abs=1e-6)
    ref = 0.5 * (0.0 - (1 / np.sqrt(2)) / 2)
    assert float(sym) == pytest.approx(ref, abs=1e-6)


def test_simsiam_no_gradient_to_z():
    p = tf.Variable(np.random.default_rng(4).normal(size=(3, 4)).astype("f"))
    z = tf.Variable(np.random.default_rng(5).normal(size=(3, 4)).astype("f"))
    with tf.GradientTape() as tape:
        loss = L.simsiam_loss(p, z)
    gp, gz = tape.gradient(loss, [p, z])
    assert np.abs(gp.numpy()).max() > 1e-4
    assert gz is None or np.abs(gz.numpy()).max() == 0.0


# ---------------------------------------------------------------------------
# Masked reconstruction


def test_masked_mse_hand_case():
    pred = np.zeros((1, 3, 2), np.float32)
    target = np.array([[[1, 1], [2, 0], [3, 3]]], np.float32)
    mask = np.array([[1, 1, 0]], np.float32)
    # token means: (1+1)/2 = 1, (4+0)/2 = 2 ; masked mean = 1.5
    assert float(L.masked_mse(pred, target, mask)) == pytest.approx(1.5)
    # unmasked predictions do not matter
    pred2 = pred.copy()
    pred2[0, 2] = [100.0, -7.0]
    assert float(L.masked_mse(pred2, target, mask)) == pytest.approx(1.5)
    # bool mask accepted
    assert float(L.masked_mse(pred, target, mask.astype(bool))) == \
        pytest.approx(1.5)


def test_masked_mse_no_mask_and_gradients():
    rng = np.random.default_rng(6)
    pred = tf.Variable(rng.normal(size=(2, 4, 3)).astype("f"))
    target = rng.normal(size=(2, 4, 3)).astype("f")
    none = np.zeros((2, 4), np.float32)
    with tf.GradientTape() as tape:
        loss = L.masked_mse(pred, target, none)
    g = tape.gradient(loss, pred).numpy()
    assert float(loss) == 0.0 and np.all(np.isfinite(g)) and np.all(g == 0)
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    with tf.GradientTape() as tape:
        loss = L.masked_mse(pred, target, mask)
    g = tape.gradient(loss, pred).numpy()
    assert np.all(g[mask == 0] == 0.0)
    assert np.all(np.abs(g[mask == 1]).max(axis=-1) > 0)
    ref = ((pred.numpy() - target) ** 2).mean(-1)[mask == 1].mean()
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def test_per_token_layernorm():
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 5.0, size=(2, 3, 16)).astype("float16")
    y = _np(L.per_token_layernorm(x))
    assert y.dtype == np.float32
    xf = x.astype(np.float64)
    ref = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(
        xf.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, atol=1e-4)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)


# ---------------------------------------------------------------------------
# Dice + CE


def test_dice_ce_perfect_prediction():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, size=(2, 4, 4, 4))
    logits = 30.0 * np.eye(3, dtype=np.float32)[labels]
    assert float(L.soft_dice_loss(logits, labels, 3)) == \
        pytest.approx(0.0, abs=1e-6)
    assert float(L.dice_ce_loss(logits, labels, 3)) == \
        pytest.approx(0.0, abs=1e-6)
    # trailing channel of 1 on the labels is accepted
    assert float(L.dice_ce_loss(logits, labels[..., None], 3)) == \
        pytest.approx(0.0, abs=1e-6)


def test_dice_ce_uniform_logits_hand_case():
    # 1 x 1 x 2 x 2 volume, 2 classes, uniform probabilities 0.5
    labels = np.array([[[[0, 1], [1, 1]]]])
    logits = np.zeros((1, 1, 2, 2, 2), np.float32)
    n, n1 = 4, 3
    d0 = (2 * 0.5 * (n - n1)) / (0.5 * n + (n - n1))  # 1/3
    d1 = (2 * 0.5 * n1) / (0.5 * n + n1)  # 3/5
    dice = 1 - (d0 + d1) / 2
    ce = np.log(2.0)
    got = L.dice_ce_loss(logits, labels, 2, smooth=0.0)
    assert float(got) == pytest.approx(dice + ce, abs=1e-6)
    no_bg = L.dice_ce_loss(logits, labels, 2, smooth=0.0,
                           include_background=False)
    assert float(no_bg) == pytest.approx(1 - d1 + ce, abs=1e-6)
    only_dice = L.dice_ce_loss(logits, labels, 2, smooth=0.0, ce_weight=0.0)
    assert float(only_dice) == pytest.approx(dice, abs=1e-6)


def test_dice_ce_class_weights():
    # two voxels: class 0 predicted with p=0.8, class 1 with p=0.5
    labels = np.array([[[[0, 1]]]])
    logits = np.zeros((1, 1, 1, 2, 2), np.float32)
    logits[0, 0, 0, 0] = [np.log(4.0), 0.0]  # softmax -> (0.8, 0.2)
    w = [1.0, 3.0]
    ce_ref = (1 * -np.log(0.8) + 3 * -np.log(0.5)) / 4
    got = L.dice_ce_loss(logits, labels, 2, class_weights=w, dice_weight=0.0)
    assert float(got) == pytest.approx(ce_ref, abs=1e-6)
    plain = L.dice_ce_loss(logits, labels, 2, dice_weight=0.0)
    assert float(plain) == pytest.approx((-np.log(0.8) - np.log(0.5)) / 2,
                                         abs=1e-6)


# ---------------------------------------------------------------------------
# Monitors and precision


def test_contrastive_accuracy():
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0],
                       [2.0, 2.5, 0.0], [9.0, 0.0, 0.0]], np.float32)
    assert float(L.contrastive_accuracy(logits)) == pytest.approx(0.5)


def test_embedding_std():
    z = np.tile(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), (8, 1))
    assert float(L.embedding_std(z)) == pytest.approx(0.0, abs=1e-6)
    d = 64
    z = np.random.default_rng(9).normal(size=(2048, d)).astype("f")
    assert float(L.embedding_std(z)) == pytest.approx(1 / np.sqrt(d), rel=0.05)


def test_half_precision_inputs_give_float32():
    rng = np.random.default_rng(10)
    h = lambda *s: rng.normal(size=s).astype("float16")  # noqa: E731
    outs = [
        L.info_nce(h(2, 4), h(2, 4), h(3, 4))[0],
        L.nt_xent(h(2, 4), h(2, 4))[0],
        L.simsiam_loss(h(2, 4), h(2, 4)),
        L.masked_mse(h(2, 3, 4), h(2, 3, 4), np.ones((2, 3), "float16")),
        L.dice_ce_loss(h(1, 2, 2, 2, 3), rng.integers(0, 3, (1, 2, 2, 2)), 3),
        L.contrastive_accuracy(h(2, 3)),
        L.embedding_std(h(4, 3)),
    ]
    for o in outs:
        assert o.dtype == tf.float32 and np.isfinite(float(o))
    big = np.full((2, 4), 300.0, "float16")  # overflows if squared in fp16
    assert np.isfinite(float(L.simsiam_loss(big, big)))
