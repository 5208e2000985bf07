"""Sliding-window inference: coverage, weighting, padding, TTA, bounded batches."""

import numpy as np
import pytest
from scipy import ndimage

from rr_tf import inference as inf


# --- toy predict_fns ---------------------------------------------------------

def per_voxel_fn(x):
    """Translation- and flip-equivariant: logits depend on the voxel only."""
    v = x[..., 0]
    return np.stack([v, 2.0 * v - 0.3, np.sin(3.0 * v)], axis=-1)


def box_conv_fn(x):
    """3x3x3 mean filter (zero padding per window) -> 2 logits. Mirror
    symmetric kernel, so flip-equivariant on each window."""
    v = x[..., 0]
    k = np.ones((1, 3, 3, 3), np.float32) / 27.0
    m = ndimage.convolve(v, k, mode="constant", cval=0.0)
    return np.stack([m, -m + 0.5 * v], axis=-1)


def rng_volume(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# --- window_starts -----------------------------------------------------------

@pytest.mark.parametrize("size,window,overlap", [
    (10, 4, 0.5), (96, 32, 0.5), (97, 32, 0.5), (33, 32, 0.25), (100, 7, 0.0), (50, 16, 0.9),
    (16, 16, 0.5), (5, 16, 0.5), (200, 64, 0.0),
])
def test_window_starts_cover_the_axis_with_at_least_the_overlap(size, window, overlap):
    starts = inf.window_starts(size, window, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if window >= size:
        assert starts == [0]
        return
    assert starts[-1] == size - window  # flush with the end
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()
    steps = np.diff(starts)
    assert steps.max() <= max(1, int(np.ceil(window * (1 - overlap))))
    assert steps.min() >= 1


def test_window_starts_hand_cases():
    assert inf.window_starts(96, 32, 0.5) == [0, 16, 32, 48, 64]
    assert inf.window_starts(64, 32, 0.0) == [0, 32]
    assert inf.window_starts(65, 32, 0.0) == [0, 17, 33]  # 3 windows, step 16.5 rounded half up
    assert inf.window_starts(24, 16, 0.5) == [0, 8]
    with pytest.raises(ValueError):
        inf.window_starts(10, 4, 1.0)


def test_gaussian_map_is_symmetric_peaked_and_floored():
    g = inf.gaussian_importance_map((8, 6, 5))
    assert g.dtype == np.float32 and g.shape == (8, 6, 5)
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1])
    assert g.max() == pytest.approx(1.0, abs=1e-6) and g.min() >= 1e-3
    # 1D profile along axis 0 at the centre: exp(-x^2 / (2 sigma^2)), sigma = 8/8 = 1
    prof = inf.gaussian_importance_map((8, 1, 1))[:, 0, 0]
    x = np.arange(8) - 3.5
    np.testing.assert_allclose(prof, np.maximum(np.exp(-0.5 * x ** 2) / np.exp(-0.5 * 0.25), 1e-3),
                               rtol=1e-5)


# --- equivalences ------------------------------------------------------------

def test_volume_inside_one_window_equals_one_full_window_prediction():
    vol = rng_volume((12, 10, 7), seed=1)
    window = (16, 16, 8)
    probs = inf.sliding_window_inference(vol, box_conv_fn, window, overlap=0.5, window_batch=3)
    assert probs.shape == (12, 10, 7, 2) and probs.dtype == np.float32
    padded = np.pad(vol, [(2, 2), (3, 3), (0, 1)])  # centred pad to the window
    ref = inf.softmax(box_conv_fn(padded[None, ..., None]))[0][2:14, 3:13, 0:7]
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)


def test_volume_equal_to_window_and_batched_input():
    vol = rng_volume((8, 8, 8), seed=2)
    ref = inf.softmax(box_conv_fn(vol[None, ..., None]))[0]
    for v in (vol, vol[..., None], vol[None, ..., None]):
        out = inf.sliding_window_inference(v, box_conv_fn, (8, 8, 8))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batched"):
        inf.sliding_window_inference(np.stack([vol, vol])[..., None], box_conv_fn, (8, 8, 8))


@pytest.mark.parametrize("gaussian", [True, False])
def test_per_voxel_fn_on_large_volume_with_overlap_equals_direct(gaussian):
    vol = rng_volume((37, 29, 20), seed=3)
    probs = inf.sliding_window_inference(vol, per_voxel_fn, (16, 12, 8), overlap=0.5,
                                         window_batch=5, gaussian=gaussian)
    ref = inf.softmax(per_voxel_fn(vol[None, ..., None]))[0]
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_gaussian_blending_weights_by_hand():
    """Two windows along axis 0 (starts 0 and 8); each predicts constant
    probabilities depending on its start; voxel i=10 is local 10 in the first
    and local 2 in the second window."""
    vol = np.broadcast_to(np.arange(24, dtype=np.float32)[:, None, None], (24, 4, 4)).copy()

    def fn(x):
        start = x[:, 0, 0, 0, 0]  # first voxel's value = window start
        p0 = np.where(start == 0, 0.1, 0.6)
        p = np.stack([p0, 1 - p0], -1)[:, None, None, None, :]
        return np.log(np.broadcast_to(p, x.shape[:4] + (2,)))

    out = inf.sliding_window_inference(vol, fn, (16, 4, 4), overlap=0.5, window_batch=1)
    x = np.arange(16) - 7.5
    g = np.exp(-0.5 * (x / 2.0) ** 2)
    g = np.maximum(g / g.max(), 1e-3)
    expect = (g[10] * 0.1 + g[2] * 0.6) / (g[10] + g[2])
    # centre of axes 1, 2 (same Gaussian factor in both windows, above the floor)
    np.testing.assert_allclose(out[10, 1:3, 1:3, 0], expect, rtol=1e-5)
    np.testing.assert_allclose(out[3, :, :, 0], 0.1, rtol=1e-5)   # first window only
    np.testing.assert_allclose(out[20, :, :, 0], 0.6, rtol=1e-5)  # second window only
    # uniform weights: plain mean where the windows overlap
    flat = inf.sliding_window_inference(vol, fn, (16, 4, 4), overlap=0.5, gaussian=False)
    np.testing.assert_allclose(flat[10, :, :, 0], 0.35, rtol=1e-5)
    # at the window corner along axes 1, 2 the product falls below the floor
    # (1e-3) in both windows, so the two are averaged equally
    np.testing.assert_allclose(out[10, 0, 0, 0], 0.35, rtol=1e-5)


# --- test-time augmentation ---------------------------------------------------

def test_tta_with_flip_equivariant_fn_equals_no_tta():
    vol = rng_volume((20, 18, 12), seed=4)
    kw = dict(window=(12, 12, 8), overlap=0.5, window_batch=4)
    plain = inf.sliding_window_inference(vol, box_conv_fn, **kw)
    tta = inf.sliding_window_inference(vol, box_conv_fn, tta=True, **kw)
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-6)
    tta_pv = inf.sliding_window_inference(vol, per_voxel_fn, tta=True, **kw)
    np.testing.assert_allclose(tta_pv, inf.softmax(per_voxel_fn(vol[None, ..., None]))[0],
                               rtol=1e-5, atol=1e-6)


def test_tta_undoes_flips_on_outputs():
    """A fn that ignores its input and predicts a ramp along axis 0: mirrored
    TTA along axis 0 must average the ramp with its reverse."""
    def ramp_fn(x):
        r = np.linspace(-2.0, 2.0, x.shape[1], dtype=np.float32)[None, :, None, None]
        r = np.broadcast_to(r, x.shape[:4])
        return np.stack([r, np.zeros_like(r)], -1)

    vol = np.zeros((8, 4, 4), np.float32)
    out = inf.sliding_window_inference(vol, ramp_fn, (8, 4, 4), tta=True, flip_axes=(0,))
    r = np.linspace(-2.0, 2.0, 8)
    p = 1 / (1 + np.exp(-r))
    np.testing.assert_allclose(out[:, 0, 0, 0], (p + p[::-1]) / 2, rtol=1e-5)
    assert len(inf.flip_combinations((0, 1, 2))) == 8


# --- memory / batching ----------------------------------------------------------

@pytest.mark.parametrize("tta,fixed", [(False, True), (True, True), (False, False)])
def test_predict_fn_never_sees_more_than_window_batch(tta, fixed):
    sizes = []

    def rec(x):
        sizes.append(x.shape[0])
        return per_voxel_fn(x)

    vol = rng_volume((30, 20, 16), seed=5)
    window = (12, 10, 8)
    n_windows = len(inf.window_positions(vol.shape, window, 0.5))
    assert n_windows == 4 * 3 * 3
    inf.sliding_window_inference(vol, rec, window, overlap=0.5, window_batch=5, tta=tta,
                                 flip_axes=(0, 2), fixed_batch=fixed)
    n_flips = 4 if tta else 1
    assert max(sizes) <= 5
    assert len(sizes) == int(np.ceil(n_windows / 5)) * n_flips
    if fixed:
        assert set(sizes) == {5}  # one traced shape
    else:
        assert sum(sizes) == n_windows * n_flips


def test_probabilities_to_labels_and_bad_outputs():
    p = np.zeros((2, 2, 2, 3), np.float32)
    p[0, ..., 2] = 1
    p[1, ..., 1] = 1
    lab = inf.probabilities_to_labels(p)
    assert lab.dtype == np.uint8 and (lab[0] == 2).all() and (lab[1] == 1).all()
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        inf.sliding_window_inference(np.zeros((8, 8, 8)), lambda x: x[:, :4], (8, 8, 8))


def test_keras_model_predict_fn_matches_direct_call():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, None, 1))
    model = keras.Model(inp, keras.layers.Conv3D(3, 3, padding="same")(inp))
    vol = rng_volume((10, 9, 8), seed=6)
    probs = inf.sliding_window_inference(vol, inf.keras_predict_fn(model), (12, 12, 8))
    direct = model(np.pad(vol, [(1, 1), (1, 2), (0, 0)])[None, ..., None]).numpy()[0]
    np.testing.assert_allclose(probs, inf.softmax(direct)[1:11, 1:10], rtol=1e-4, atol=1e-5)
