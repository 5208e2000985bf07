"""Invariants of the tf-graph augment ops (rr_tf.data.augment)."""


import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from rr_tf.data import augment as A
from rr_tf.data.augment import genesis

SHAPE = (16, 16, 8, 1)
SEEDS = [(0, 1), (1, 1), (2, 5), (7, 3)]


def volume(shape=SHAPE, seed=(11, 12)):
    return tf.random.stateless_uniform(shape, seed)


def unique_volume(shape=SHAPE):
    """Distinct values in [0, 1) so permutations can be traced."""
    n = int(np.prod(shape))
    return tf.constant((np.random.default_rng(0).permutation(n) / n).reshape(shape), tf.float32)


def first(out):
    return out[0] if isinstance(out, tuple) else out


OPS = {
    "flip": lambda x, s: A.random_flip(x, s)[0],
    "rot90": lambda x, s: A.random_rot90(x, s)[0],
    "affine": lambda x, s: A.random_affine(x, s),
    "blur": lambda x, s: A.gaussian_blur(x, s),
    "noise": lambda x, s: A.gaussian_noise(x, s),
    "gamma": lambda x, s: A.random_gamma(x, s),
    "swap": lambda x, s: A.patch_swap(x, s, patch=(4, 2, 2), num_swaps=10),
    "shuffle": lambda x, s: A.local_pixel_shuffle(x, s, p=1.0, max_block=(3, 3, 2)),
    "bezier": lambda x, s: A.nonlinear_bezier(x, s, p=1.0),
    "inpaint": lambda x, s: A.inpaint(x, s),
    "outpaint": lambda x, s: A.outpaint(x, s),
    "genesis": lambda x, s: A.genesis_corrupt(x, s),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_deterministic_under_seed_and_varies_across_seeds(name):
    x = volume()
    op = OPS[name]
    outs = [op(x, tf.constant(s, tf.int32)).numpy() for s in SEEDS]
    again = op(x, tf.constant(SEEDS[0], tf.int64)).numpy()  # int64 seed, same values
    np.testing.assert_array_equal(outs[0], again)
    assert outs[0].shape == x.shape
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) >= 2, f"{name} gave the same output for {len(SEEDS)} seeds"


def test_multichannel_keeps_channels_together():
    x1 = volume()
    x = tf.concat([x1, 2.0 * x1], -1)  # channel 1 = 2 * channel 0
    for name in ("flip", "rot90", "affine", "swap", "shuffle"):
        y = OPS[name](x, tf.constant([4, 4])).numpy()
        assert y.shape == x.shape
        np.testing.assert_allclose(y[..., 1], 2.0 * y[..., 0], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(y[..., :1], OPS[name](x1, tf.constant([4, 4])).numpy(),
                                   atol=1e-6, err_msg=name)


def test_graph_and_eager_agree():
    x = volume()
    seed = tf.constant([3, 9], tf.int64)
    graph = tf.function(lambda v, s: {k: op(v, s) for k, op in OPS.items()})
    g = graph(x, seed)
    for k, op in OPS.items():
        np.testing.assert_allclose(g[k].numpy(), op(x, seed).numpy(), atol=1e-6, err_msg=k)


def test_random_apply():
    x = tf.ones([2, 2])
    assert np.all(A.random_apply(lambda v: v * 2, 1.0, [1, 2], x).numpy() == 2)
    assert np.all(A.random_apply(lambda v: v * 2, 0.0, [1, 2], x).numpy() == 1)
    hits = [float(A.random_apply(lambda v: v * 2, tf.constant(0.3), [i, 0], x)[0, 0])
            for i in range(200)]
    assert 30 < sum(h == 2 for h in hits) < 90
    a, b = A.random_apply(lambda u, v: (u + 1, v - 1), 1.0, [0, 0], x, x)
    assert float(a[0, 0]) == 2 and float(b[0, 0]) == 0


# ------------------------------------------------------------------ spatial
def test_flip_bits_match_and_flip_is_involution():
    x = unique_volume()
    lab = tf.cast(x[..., 0] * 5, tf.int32)
    seen = set()
    for i in range(12):
        seed = tf.constant([i, 4])
        y, ly, bits = A.random_flip(x, seed, label=lab)
        bits = bits.numpy()
        seen.add(tuple(bits))
        assert bits.dtype == np.int32 and bits.shape == (3,)
        axes = tuple(a for a in range(3) if bits[a])
        np.testing.assert_array_equal(y.numpy(), np.flip(x.numpy(), axes))
        np.testing.assert_array_equal(ly.numpy(), np.flip(lab.numpy(), axes))
        assert ly.shape == lab.shape
        # the same flip again is the identity, exactly
        z, _ = A.random_flip(y, seed)
        np.testing.assert_array_equal(z.numpy(), x.numpy())
        np.testing.assert_array_equal(A.apply_flips(y, bits).numpy(), x.numpy())
    assert len(seen) >= 4
    _, bits = A.random_flip(x, [1, 2], axes=(1,), p=1.0)
    np.testing.assert_array_equal(bits.numpy(), [0, 1, 0])


def test_rot90_matches_numpy_and_four_turns_are_identity():
    x = unique_volume((8, 8, 4, 1))
    lab = tf.cast(x * 7, tf.int32)  # (D, H, W, 1) label
    ks = set()
    for i in range(10):
        y, ly, k = A.random_rot90(x, [i, 1], label=lab, axes=(0, 1))
        k = int(k)
        ks.add(k)
        np.testing.assert_array_equal(y.numpy(), np.rot90(x.numpy(), k, (0, 1)))
        np.testing.assert_array_equal(ly.numpy(), np.rot90(lab.numpy(), k, (0, 1)))
    assert ks == {0, 1, 2, 3}
    z = x
    for _ in range(4):
        z = A.rot90(z, 1, (0, 1))
    np.testing.assert_array_equal(z.numpy(), x.numpy())
    for k in range(4):
        np.testing.assert_array_equal(A.rot90(x, tf.constant(k), (1, 0)).numpy(),
                                      np.rot90(x.numpy(), k, (1, 0)))
    with pytest.raises(ValueError, match="different sizes"):
        A.random_rot90(x, [0, 0], axes=(0, 2))


def test_affine_identity():
    x = volume()
    lab = tf.cast(x[..., 0] > 0.5, tf.int32)
    y, ly = A.random_affine(x, [5, 5], label=lab, scale=(1.0, 1.0), degrees=0.0)
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ly.numpy(), lab.numpy())
    y0 = A.random_affine(x, [5, 5], p=0.0)
    np.testing.assert_array_equal(y0.numpy(), x.numpy())


def test_affine_moves_image_and_label_together():
    d, h, w = 24, 24, 16
    img = np.zeros((d, h, w, 1), np.float32)
    img[6:16, 8:18, 4:12] = 1.0
    lab = np.zeros((d, h, w), np.int32)
    lab[6:16, 8:18, 4:12] = 7
    lab[0:3] = 3  # a third label value at one face
    changed = 0
    for i in range(4):
        y, ly = A.random_affine(tf.constant(img), [i, 2], label=tf.constant(lab),
                                scale=(0.9, 1.1), degrees=10.0)
        y, ly = y.numpy(), ly.numpy()
        assert set(np.unique(ly)) <= {0, 3, 7}  # nearest neighbour: no new values
        assert y[ly == 7].mean() > 0.85
        assert y[ly == 0].mean() < 0.1
        changed += int((ly != lab).sum() > 0)
    assert changed == 4


def test_deform_identity_and_centre_crop():
    x = volume((20, 18, 12, 1))
    lab = tf.cast(x[..., 0] * 5, tf.int32)
    y, ly = A.random_deform(x, [3, 4], label=lab, scale=(1.0, 1.0), degrees=0.0)
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-6)
    np.testing.assert_array_equal(ly.numpy(), lab.numpy())
    # a smaller output grid reads the centre of the input
    y, ly = A.random_deform(x, [3, 4], label=lab, out_shape=(10, 8, 6), scale=(1.0, 1.0),
                            degrees=0.0)
    assert y.shape == (10, 8, 6, 1) and ly.shape == (10, 8, 6)
    np.testing.assert_allclose(y.numpy(), x.numpy()[5:15, 5:13, 3:9], atol=1e-6)
    np.testing.assert_array_equal(ly.numpy(), lab.numpy()[5:15, 5:13, 3:9])


def test_deform_zoom_of_a_linear_ramp_is_exact():
    """Zoom s about the centre: output voxel o reads c + (o - c) / s. On a
    ramp (trilinear interpolation is exact on linear functions) each axis's
    value follows that map, with the per-axis anisotropic factor bounded."""
    d, h, w = 21, 17, 13
    ramp = np.arange(d, dtype=np.float32)[:, None, None, None] * np.ones((d, h, w, 1), np.float32)
    y = A.random_deform(tf.constant(ramp), [1, 1], scale=(2.0, 2.0), degrees=0.0).numpy()
    c = (d - 1) / 2.0
    np.testing.assert_allclose(y[:, 3, 3, 0], c + (np.arange(d) - c) / 2.0, atol=1e-4)
    for i in range(4):
        y = A.random_deform(tf.constant(ramp), [i, 9], scale=(1.0, 1.0), degrees=0.0,
                            anisotropy=0.2).numpy()[:, 5, 5, 0]
        slope = (y[12] - y[8]) / 4.0  # 1 / a with a in [0.8, 1.2]
        assert 1 / 1.2 - 1e-4 <= slope <= 1 / 0.8 + 1e-4


def test_deform_moves_image_and_label_together_with_elastic_and_context():
    """Image = label intensity everywhere: after rotation, zoom and elastic
    displacement every output voxel still reads its label's intensity
    (nearest and trilinear agree away from edges), the displacement stays
    within its amplitude, and the input region asked for holds the reach."""
    d, h, w = 40, 40, 28
    lab = np.zeros((d, h, w), np.int32)
    lab[8:30, 6:24, 6:20] = 1
    lab[14:22, 20:36, 10:18] = 2
    img = tf.constant(lab[..., None].astype(np.float32))
    field = A.smooth_displacement([4, 4], (20, 20, 12), 3.0)
    assert all(float(tf.reduce_max(tf.abs(f))) <= 3.0 + 1e-5 for f in field)
    assert float(tf.math.reduce_std(field[0])) > 0.3  # not zero
    out = (20, 20, 12)
    need = A.deform_input_size(out, scale=(0.8, 1.2), degrees=20.0, anisotropy=0.1, elastic=3.0)
    assert all(n >= o for n, o in zip(need, out))
    assert A.deform_input_size(out, scale=(1.0, 1.0), degrees=0.0)[0] <= out[0] + 2
    changed = 0
    for i in range(4):
        y, ly = A.random_deform(img, [i, 7], label=tf.constant(lab), out_shape=out,
                                scale=(0.8, 1.2), degrees=20.0, anisotropy=0.1, elastic=3.0)
        y, ly = y.numpy()[..., 0], ly.numpy()
        assert set(np.unique(ly)) <= {0, 1, 2}
        inner = ndimage.binary_erosion(ly == ly, iterations=1)
        agree = np.abs(y - ly)[inner] < 0.5
        assert agree.mean() > 0.95
        changed += int((ly != lab[10:30, 10:30, 8:20]).sum() > 0)
    assert changed == 4


def test_trilinear_sample_matches_scipy():
    rng = np.random.default_rng(1)
    vol = rng.random((6, 7, 5)).astype(np.float32)
    pts = rng.uniform(-2.0, 8.0, (500, 3)).astype(np.float32)
    ours = A.trilinear_sample(vol[..., None], pts)[:, 0].numpy()
    ref = ndimage.map_coordinates(vol, pts.T, order=1, mode="nearest")
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    ours = A.trilinear_sample(vol[..., None], pts, fill_value=0.5)[:, 0].numpy()
    ref = ndimage.map_coordinates(vol, pts.T, order=1, mode="grid-constant", cval=0.5)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    near = A.nearest_sample(vol[..., None], pts)[:, 0].numpy()
    idx = np.clip(np.round(pts).astype(int), 0, np.array(vol.shape) - 1)
    np.testing.assert_array_equal(near, vol[idx[:, 0], idx[:, 1], idx[:, 2]])


# ---------------------------------------------------------------- intensity
def test_blur_identity_constant_and_matches_scipy():
    x = volume()
    y = A.gaussian_blur(x, [1, 1], sigma=(0.0, 0.0))
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-6)
    c = tf.fill(SHAPE, 0.37)
    np.testing.assert_allclose(A.gaussian_blur(c, [4, 2]).numpy(), 0.37, atol=1e-6)
    sig = [0.7, 1.3, 2.0]
    ours = A.blur(x, tf.constant(sig)).numpy()[..., 0]
    ref = x.numpy()[..., 0].astype(np.float64)
    for ax, s in enumerate(sig):  # radius ceil(3 * 2) = 6, capped at n - 1
        radius = min(6, SHAPE[ax] - 1)
        ref = ndimage.gaussian_filter1d(ref, s, axis=ax, mode="reflect", truncate=radius / s)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ours.std() < x.numpy().std()


def test_noise_std_as_drawn():
    x = volume((32, 32, 16, 1))
    y = A.gaussian_noise(x, [3, 3], std=(0.1, 0.1))
    diff = (y - x).numpy()
    assert abs(diff.std() - 0.1) < 0.003 and abs(diff.mean()) < 0.003
    for i in range(3):
        s = (A.gaussian_noise(x, [i, 9]) - x).numpy().std()
        assert 0.0 <= s <= 0.26


def test_gamma_keeps_min_max_and_order():
    x = volume() * 0.8 + 0.1
    xs = x.numpy().ravel()
    for i in range(3):
        y = A.random_gamma(x, [i, 0]).numpy().ravel()
        assert y.min() == xs.min() and y.max() == xs.max()
        assert np.all(np.diff(y[np.argsort(xs)]) >= 0)  # monotone map
        assert not np.allclose(y, xs)
    c = tf.fill(SHAPE, 0.5)
    np.testing.assert_array_equal(A.random_gamma(c, [0, 0]).numpy(), c.numpy())


def test_patch_swap_is_a_permutation():
    x = unique_volume((32, 32, 16, 1))
    y = A.patch_swap(x, [2, 2], patch=(8, 4, 4), num_swaps=100).numpy()
    np.testing.assert_array_equal(np.sort(y.ravel()), np.sort(x.numpy().ravel()))
    assert (y != x.numpy()).mean() > 0.3


def test_z_normalize():
    y = A.z_normalize(volume() * 3.0 + 2.0).numpy()
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1.0) < 1e-4
    assert np.all(A.z_normalize(tf.ones(SHAPE)).numpy() == 0)


# ------------------------------------------------------------------ genesis
@pytest.mark.parametrize("max_block,num_windows", [(None, 10000), ((4, 4, 2), 10000),
                                                    ((4, 4, 2), 20)])
def test_local_pixel_shuffle_moves_values_only_within_windows(max_block, num_windows):
    """Every voxel holds an original value of the last window covering it
    (windows read the original crop, later ones win, as in the reference);
    uncovered voxels keep theirs; a round's windows do not overlap, and the
    last round's windows hold exactly their original values, permuted."""
    shape = (32, 32, 16, 1)
    x = unique_volume(shape)
    y, blocks = A.local_pixel_shuffle(x, [6, 1], p=1.0, max_block=max_block,
                                      num_windows=num_windows, return_blocks=True)
    x, y, blocks = x.numpy()[..., 0], y.numpy()[..., 0], blocks.numpy()
    bmax = max_block or tuple(max(1, n // 10) for n in shape[:3])
    per_round = len(blocks) // genesis.rounds_matching(shape[:3], bmax, num_windows)
    owner = np.full(x.shape, -1)
    for i, b in enumerate(blocks):
        size = b[3:] - b[:3]
        if not size.any():
            continue  # a window clipped away
        assert np.all(size >= 1) and np.all(size <= bmax)
        assert np.all(b[:3] >= 0) and np.all(b[3:] <= shape[:3])
        sl = tuple(slice(lo, hi) for lo, hi in zip(b[:3], b[3:]))
        if i >= len(blocks) - per_round:  # the last round: disjoint, exact permutations
            assert not (owner[sl] >= len(blocks) - per_round).any(), "windows of a round overlap"
            np.testing.assert_array_equal(np.sort(y[sl].ravel()), np.sort(x[sl].ravel()))
        owner[sl] = i
    order = np.argsort(x.ravel())
    at = order[np.searchsorted(x.ravel()[order], y.ravel())]  # where each value came from
    np.testing.assert_array_equal(x.ravel()[at], y.ravel())
    src = np.stack(np.unravel_index(at, x.shape), -1)
    inside = owner.ravel() >= 0
    box = blocks[owner.ravel()[inside]]
    assert np.all((src[inside] >= box[:, :3]) & (src[inside] < box[:, 3:])), "moved out of its window"
    np.testing.assert_array_equal(y.ravel()[~inside], x.ravel()[~inside])
    assert (y != x).mean() > 0.5 * inside.mean()
    z, none = A.local_pixel_shuffle(tf.constant(x[..., None]), [6, 1], p=0.0,
                                    return_blocks=True)
    np.testing.assert_array_equal(z.numpy()[..., 0], x)
    assert not none.numpy().any()


def test_local_pixel_shuffle_covers_what_the_reference_covers():
    """On a 64x64x32 crop the reference's 10 000 windows (sizes up to a tenth
    of each axis) cover about 82 % of the voxels; so do rr_tf's windows, and
    the op compiles under XLA."""
    shape = (64, 64, 32)
    assert abs(genesis.reference_coverage(shape, (6, 6, 3), 10000) - 0.82) < 0.01
    x = tf.random.stateless_uniform(shape + (1,), [1, 2])
    small = tf.function(lambda v, s: A.local_pixel_shuffle(v, s, p=1.0), jit_compile=True)
    assert small(x[:16, :16, :8], tf.constant([1, 1])).shape == (16, 16, 8, 1)  # XLA compiles it
    op = tf.function(lambda v, s: A.local_pixel_shuffle(v, s, p=1.0, return_blocks=True))
    for seed in ([3, 4], [5, 6]):
        y, blocks = op(x, tf.constant(seed))
        covered = np.zeros(shape, bool)
        for b in blocks.numpy():
            covered[b[0]:b[3], b[1]:b[4], b[2]:b[5]] = True
        assert 0.79 < covered.mean() < 0.87, covered.mean()
        changed = (y.numpy() != x.numpy())[..., 0]
        assert not changed[~covered].any() and changed.mean() > 0.75


def test_bezier_is_monotone_in_unit_range():
    ramp = tf.reshape(tf.linspace(0.0, 1.0, 16 * 16 * 8), SHAPE)
    for i in range(4):
        for invert, sign in ((0.0, 1), (1.0, -1)):
            y = A.nonlinear_bezier(ramp, [i, 3], p=1.0, invert_p=invert).numpy().ravel()
            assert y.min() >= 0.0 and y.max() <= 1.0
            assert np.all(sign * np.diff(y) >= -1e-7)
            lo, hi = (0.0, 1.0) if sign > 0 else (1.0, 0.0)
            assert abs(y[0] - lo) < 1e-6 and abs(y[-1] - hi) < 1e-6
    lut = A.bezier_lut([1, 1], invert_p=0.0).numpy()
    assert not np.allclose(lut, np.linspace(0, 1, lut.size), atol=1e-3)


def _mask(boxes, shape):
    m = np.zeros(shape, bool)
    for b in boxes:
        m[b[0]:b[3], b[1]:b[4], b[2]:b[5]] = True
    return m


def test_inpaint_changes_only_its_boxes():
    shape = (32, 32, 16, 1)
    x = volume(shape)
    counts = set()
    for i in range(6):
        y, boxes = A.inpaint(x, [i, 8], return_boxes=True)
        y, boxes = y.numpy()[..., 0], boxes.numpy()
        active = boxes[np.any(boxes[:, 3:] > boxes[:, :3], axis=1)]
        counts.add(len(active))
        for b in active:
            size = b[3:] - b[:3]
            assert np.all(size >= [5, 5, 2]) and np.all(size <= [10, 10, 5])
        m = _mask(active, shape[:3])
        np.testing.assert_array_equal(y[~m], x.numpy()[..., 0][~m])
        assert np.all((y[m] >= 0) & (y[m] <= 1))
        if m.any():  # 5% of calls draw no box at all, as published
            assert (y[m] != x.numpy()[..., 0][m]).mean() > 0.99
    assert max(counts) <= 5 and max(counts) >= 2


def test_outpaint_keeps_inner_boxes():
    shape = (32, 32, 16, 1)
    x = volume(shape)
    for i in range(6):
        y, boxes = A.outpaint(x, [i, 9], return_boxes=True)
        y, boxes = y.numpy()[..., 0], boxes.numpy()
        active = boxes[np.any(boxes[:, 3:] > boxes[:, :3], axis=1)]
        assert 1 <= len(active) <= 5
        for b in active:
            size = b[3:] - b[:3]
            assert np.all(size >= [13, 13, 6]) and np.all(size <= [18, 18, 9])
        m = _mask(active, shape[:3])
        np.testing.assert_array_equal(y[m], x.numpy()[..., 0][m])
        assert (y[~m] != x.numpy()[..., 0][~m]).mean() > 0.99
        assert np.all((y >= 0) & (y <= 1))


def test_genesis_corrupt_branches():
    x = volume((32, 32, 16, 1))
    changed = [float(tf.reduce_mean(tf.cast(A.genesis_corrupt(x, [i, 0]) != x, tf.float32)))
               for i in range(10)]
    assert all(0.0 <= c <= 1.0 for c in changed)
    assert max(changed) > 0.5  # out-painting happened at least once
    ident = A.genesis_corrupt(x, [0, 0], shuffle_p=0.0, nonlinear_p=0.0, paint_p=0.0)
    np.testing.assert_array_equal(ident.numpy(), x.numpy())


# ------------------------------------------------------------------ tf.data
def _pcrl_chain(x, seed):
    s = tf.random.experimental.stateless_split(seed, 6)
    x, flips = A.random_flip(x, s[0])
    x = A.random_affine(x, s[1])
    target = x
    x = A.gaussian_blur(x, s[2])
    x = A.gaussian_noise(x, s[3])
    x = A.random_gamma(x, s[4])
    x = A.patch_swap(x, s[5])
    return x, target, flips


def _crops(shape, n):
    def make(i):
        seed = tf.stack([i, tf.constant(17, tf.int64)])
        return tf.random.stateless_uniform(shape, seed), seed
    return tf.data.Dataset.range(n).map(make)


def test_ops_inside_tf_data_map():
    shape = (32, 32, 16, 1)
    ds = _crops(shape, 6)
    gen = ds.map(lambda x, s: (A.genesis_corrupt(x, s), x), num_parallel_calls=tf.data.AUTOTUNE)
    chain = ds.map(lambda x, s: _pcrl_chain(x, s), num_parallel_calls=tf.data.AUTOTUNE)
    assert gen.element_spec[0].shape == shape
    assert chain.element_spec[0].shape == shape and chain.element_spec[2].shape == (3,)
    outs = [g.numpy() for g, _ in gen]
    again = [g.numpy() for g, _ in gen]
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a, b)  # deterministic across epochs
    for (x, t, f), (x0, s) in zip(chain, ds):
        ref = _pcrl_chain(x0, s)
        np.testing.assert_allclose(x.numpy(), ref[0].numpy(), atol=1e-5)
        assert np.all(np.isfinite(x.numpy()))


def test_random_contrast_keeps_the_mean_and_scales_deviations():
    x = volume()
    y = A.random_contrast(x, (3, 4), factor=(0.5, 0.6))
    dx = x.numpy() - x.numpy().mean()
    dy = y.numpy() - y.numpy().mean()
    assert abs(y.numpy().mean() - x.numpy().mean()) < 1e-5
    ratio = dy.ravel() @ dx.ravel() / (dx.ravel() @ dx.ravel())
    assert 0.5 <= ratio <= 0.6 and np.allclose(dy, ratio * dx, atol=1e-5)
    assert np.array_equal(A.random_contrast(x, (3, 4), p=0.0).numpy(), x.numpy())


def test_label_offsets_shift_each_label_value_alone():
    label = np.zeros(SHAPE[:3], np.int32)
    label[:8] = 3
    label[8:, :4] = 7
    x = volume()
    y = A.label_offsets(x, tf.constant(label), (9, 2), max_shift=0.2).numpy()
    d = (y - x.numpy())[..., 0]
    assert np.allclose(d[label == 0], 0.0)
    for k in (3, 7):
        assert np.ptp(d[label == k]) < 1e-6 and abs(d[label == k][0]) <= 0.2
    assert abs(d[label == 3][0] - d[label == 7][0]) > 1e-4
    # deterministic per seed
    assert np.array_equal(y, A.label_offsets(x, tf.constant(label), (9, 2), max_shift=0.2).numpy())
