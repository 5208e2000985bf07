"""Tests of rr_tf.models: shapes, parameter count, position embedding, masking,
patchify, hybrid encoder, heads and .keras round trips.

Tiny widths (base 4) and 16^3-32^3 inputs keep the whole file CPU-cheap.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.models import (MLP, ConvBlock, ConvUnit, HybridEncoder, MaskedTokenDecoder,
                          PatchEmbedding3D, PredictorHead, ProjectionHead, ReconstructionHead,
                          TransformerBlock, TransformerEncoder, UNet3D, ViT3D, gather_tokens,
                          interpolate_pos_embed, map_to_tokens, num_visible, patchify,
                          random_masking, sincos_position_embedding_3d,
                          sincos_position_embedding_3d_numpy, unet3d_param_count, unpatchify,
                          upsample3d)
from rr_tf.models.layers import MaxPool, resize3d


def rand(*shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def tiny_hybrid(**kw):
    args = dict(base_width=4, levels=4, dim=24, depth=2, heads=2, decoder_dim=12,
                decoder_depth=1, decoder_heads=2)
    args.update(kw)
    return HybridEncoder(**args)


# ---------------------------------------------------------------------------
# UNet3D
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("levels,extra", [(2, False), (3, False), (4, False), (4, True)])
def test_unet_pyramid_and_decoder_shapes(levels, extra):
    b = 4
    model = UNet3D(base_width=b, levels=levels, extra_stride_stage=extra, out_channels=2)
    x = rand(2, 16, 16, 16, 1)
    pyramid = model.encode(x)
    n = levels + int(extra)
    assert len(pyramid) == n and model.strides == [2 ** k for k in range(n)]
    chans = [b * 2 ** k for k in range(1, levels + 1)] + ([b * 2 ** levels] if extra else [])
    for k, (p, c) in enumerate(zip(pyramid, chans)):
        s = 16 // 2 ** k
        assert tuple(p.shape) == (2, s, s, s, c)
    stages, out = model.decode(pyramid)
    assert len(stages) == n - 1
    for i, st in enumerate(stages):  # coarse to fine, channels of the skip level
        k = n - 2 - i
        s = 16 // 2 ** k
        assert tuple(st.shape) == (2, s, s, s, chans[k])
    assert tuple(out.shape) == (2, 16, 16, 16, 2)
    np.testing.assert_allclose(model(x), out, atol=1e-5)
    names = [layer.name for layer in model.encoder_layers]
    assert names == [f"enc{k}" for k in range(1, n + 1)]
    dec_names = [layer.name for layer in model.decoder_layers]
    expect = []
    for k in range(n - 1, 0, -1):
        expect += [f"up{k}", f"dec{k}"]
    assert dec_names == expect and model.head.name == "head"


def test_unet_genesis_channels_at_base_32():
    model = UNet3D(base_width=32)
    assert model.stage_filters == [(32, 64), (64, 128), (128, 256), (256, 512)]
    assert model.decoder_channels == [256, 128, 64]


@pytest.mark.parametrize("skips", [True, False])
def test_unet_skips_change_decoder_input_channels(skips):
    model = UNet3D(base_width=4, levels=3, skips=skips)
    model.build((None, 16, 16, 16, 1))
    # up2 keeps the 32 channels of enc3; the skip from enc2 adds 16 more.
    assert model.get_layer("up2").kernel.shape[-1] == 32
    dec2_in = model.get_layer("dec2").units[0].conv.kernel.shape[-2]
    dec1_in = model.get_layer("dec1").units[0].conv.kernel.shape[-2]
    assert dec2_in == (32 + 16 if skips else 32)
    assert dec1_in == (16 + 8 if skips else 16)
    out = model(rand(1, 16, 16, 16, 1))
    assert tuple(out.shape) == (1, 16, 16, 16, 1)


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_unet_norm_variants(norm):
    model = UNet3D(base_width=4, levels=2, norm=norm, final_activation="sigmoid")
    out = np.asarray(model(rand(1, 16, 16, 16, 1), training=True))
    assert out.shape == (1, 16, 16, 16, 1) and np.all((out >= 0) & (out <= 1))
    layer = model.get_layer("enc1").units[0].norm
    if norm == "batch":
        assert isinstance(layer, keras.layers.BatchNormalization)
        assert layer.epsilon == 1e-5 and layer.momentum == 0.9
    elif norm == "group":
        assert isinstance(layer, keras.layers.GroupNormalization)
        assert layer.groups == 4  # 4 channels < 8 groups
        assert model.get_layer("enc2").units[1].norm.groups == 8
    elif norm == "instance":
        assert layer.groups in (-1, 4)  # one group per channel
    else:
        assert isinstance(layer, keras.layers.Identity)


def test_batchnorm_momentum_is_pytorch_0_1():
    unit = ConvUnit(3, norm="batch")
    x = rand(2, 8, 8, 8, 2)
    unit(x, training=True)
    conv_out = np.asarray(unit.conv(x))
    expect = 0.1 * conv_out.mean(axis=(0, 1, 2, 3))
    np.testing.assert_allclose(np.asarray(unit.norm.moving_mean), expect, rtol=1e-4, atol=1e-6)


def test_unet_param_count_base32_build_only():
    model = UNet3D(base_width=32)
    model.build((None, 64, 64, 32, 1))  # no forward pass
    total = model.count_params()
    assert total == unet3d_param_count(32, 4) == 19_078_337
    # non-trainable BN moving mean/variance: 2 per channel of every unit
    bn_stats = sum(2 * f for stage in model.stage_filters for f in stage) \
        + sum(2 * 2 * c for c in model.decoder_channels)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == total - bn_stats
    assert 18.5e6 < trainable < 19.5e6  # "about 19 M"
    noskip = UNet3D(base_width=32, skips=False)
    noskip.build((None, 64, 64, 32, 1))
    assert noskip.count_params() == unet3d_param_count(32, 4, skips=False)


@pytest.mark.parametrize("kw", [dict(levels=2, norm="group"), dict(levels=3, norm="none"),
                                dict(levels=4, extra_stride_stage=True),
                                dict(levels=4, extra_stride_stage=True, encoder_only=True)])
def test_unet_param_formula_small(kw):
    model = UNet3D(base_width=4, **kw)
    model.build((None, 16, 16, 16, 1))
    assert model.count_params() == unet3d_param_count(4, **kw)


def test_unet_weight_paths_and_validation():
    model = UNet3D(base_width=4, levels=2, name="genesis")
    model.build((None, 16, 16, 16, 1))
    paths = {w.path for w in model.weights}
    assert "genesis/enc1/unit1/conv/kernel" in paths
    assert "genesis/dec1/unit2/norm/moving_variance" in paths
    assert "genesis/up1/kernel" in paths and "genesis/head/kernel" in paths
    with pytest.raises(ValueError):
        UNet3D(levels=1)
    with pytest.raises(ValueError):
        UNet3D(norm="layer")
    with pytest.raises(ValueError):
        UNet3D(base_width=4, levels=4).build((None, 20, 16, 16, 1))


# ---------------------------------------------------------------------------
# ViT3D, position embedding, masking, patchify
# ---------------------------------------------------------------------------

def test_vit_token_counts_and_grids():
    vit = ViT3D(patch_size=8, dim=24, depth=2, heads=2)
    assert tuple(vit(rand(2, 32, 32, 16, 1)).shape) == (2, 4 * 4 * 2, 24)
    # a model built at one grid runs at another (analytic position embedding)
    assert tuple(vit(rand(1, 16, 16, 16, 1)).shape) == (1, 8, 24)
    aniso = ViT3D(patch_size=(4, 8, 8), dim=12, depth=1, heads=2)
    tokens, grid = aniso.embed(rand(1, 16, 32, 16, 1))
    assert grid == (4, 4, 2) and tuple(tokens.shape) == (1, 32, 12)
    latent, hidden = aniso.encode_tokens(tokens, return_hidden_states=True)
    assert len(hidden) == 1 and tuple(latent.shape) == (1, 32, 12)
    ids_keep = np.array([[0, 5, 7]], dtype="int32")
    assert tuple(aniso.encode_tokens(tokens, ids_keep).shape) == (1, 3, 12)
    emb = PatchEmbedding3D(8, 6)
    assert emb.compute_output_shape((None, 32, 32, 16, 1)) == (None, 32, 6)


@pytest.mark.parametrize("shape", [(2, 8, 12, 4, 2), (1, 9, 13, 6, 1)])
def test_patch_embedding_matmul_equals_the_strided_conv(shape):
    """The layer computes patchify @ kernel; the Conv3D it holds (kernel =
    stride = patch, valid: remainders dropped) must give the same tokens."""
    emb = PatchEmbedding3D((4, 4, 2), 5)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    tokens = emb(x).numpy()
    conv = emb.proj(x).numpy()
    np.testing.assert_allclose(tokens, conv.reshape(shape[0], -1, 5), rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == (shape[1] // 4) * (shape[2] // 4) * (shape[3] // 2)


@pytest.mark.parametrize("grid,dim", [((2, 3, 4), 24), ((4, 4, 4), 64)])
def test_sincos_position_embedding(grid, dim):
    emb = np.asarray(sincos_position_embedding_3d(grid, dim))
    assert emb.shape == (int(np.prod(grid)), dim)
    np.testing.assert_allclose(emb, sincos_position_embedding_3d_numpy(grid, dim), atol=1e-5)
    # one position by hand: token (d, h, w) = (1, 2, 3) in row-major order
    d, h, w = 1, 2, 3 % grid[2]
    idx = (d * grid[1] + h) * grid[2] + w
    k = dim // 6
    omega = 10000.0 ** (-np.arange(k) / k)
    expect = np.concatenate([np.sin(d * omega), np.cos(d * omega), np.sin(h * omega),
                             np.cos(h * omega), np.sin(w * omega), np.cos(w * omega),
                             np.zeros(dim - 6 * k)])
    np.testing.assert_allclose(emb[idx], expect, atol=1e-5)
    # the same position has the same code on a bigger grid
    big = np.asarray(sincos_position_embedding_3d((grid[0] + 2, grid[1] + 1, grid[2]), dim))
    big_idx = (d * (grid[1] + 1) + h) * grid[2] + w
    np.testing.assert_allclose(big[big_idx], expect, atol=1e-5)


def test_interpolate_pos_embed():
    table = sincos_position_embedding_3d_numpy((2, 2, 2), 12)
    np.testing.assert_allclose(interpolate_pos_embed(table, (2, 2, 2), (2, 2, 2)), table)
    up = interpolate_pos_embed(table, (2, 2, 2), (4, 4, 2))
    assert up.shape == (32, 12)
    # corners replicate, interior is a convex mix
    np.testing.assert_allclose(up[0], table[0], atol=1e-6)
    assert np.all(up.min(0) >= table.min(0) - 1e-6) and np.all(up.max(0) <= table.max(0) + 1e-6)


@pytest.mark.parametrize("n,ratio,keep", [(64, 0.75, 16), (64, 0.6, 26), (27, 0.5, 14),
                                          (8, 0.6, 3), (10, 0.6, 4)])
def test_random_masking(n, ratio, keep):
    tokens = rand(3, n, 5)
    visible, token_mask, ids_restore, ids_keep = random_masking(tokens, ratio, seed=7)
    assert keep == num_visible(n, ratio) == math.floor(n * (1 - ratio) + 0.5)
    assert tuple(visible.shape) == (3, keep, 5) and tuple(ids_keep.shape) == (3, keep)
    token_mask, ids_restore, ids_keep = map(np.asarray, (token_mask, ids_restore, ids_keep))
    assert token_mask.shape == (3, n) and np.all(token_mask.sum(1) == n - keep)
    for b in range(3):
        assert np.all(token_mask[b, ids_keep[b]] == 0)
        np.testing.assert_array_equal(np.asarray(visible)[b], tokens[b, ids_keep[b]])
    # ids_restore inverts the shuffle: visible + masked (in shuffle order) -> original
    ids_shuffle = np.argsort(ids_restore, axis=1)
    np.testing.assert_array_equal(ids_shuffle[:, :keep], ids_keep)
    masked = gather_tokens(tokens, ids_shuffle[:, keep:])
    restored = gather_tokens(np.concatenate([visible, masked], 1), ids_restore)
    np.testing.assert_array_equal(np.asarray(restored), tokens)


def test_masking_determinism():
    tokens = rand(2, 32, 4)
    a = random_masking(tokens, 0.75, seed=3)[3]
    b = random_masking(tokens, 0.75, seed=3)[3]
    np.testing.assert_array_equal(a, b)
    g1, g2 = keras.random.SeedGenerator(11), keras.random.SeedGenerator(11)
    s1 = [np.asarray(random_masking(tokens, 0.75, g1)[3]) for _ in range(2)]
    s2 = [np.asarray(random_masking(tokens, 0.75, g2)[3]) for _ in range(2)]
    np.testing.assert_array_equal(s1[0], s2[0])
    np.testing.assert_array_equal(s1[1], s2[1])
    assert not np.array_equal(s1[0], s1[1])  # the generator advances

    gen = keras.random.SeedGenerator(5)

    @tf.function
    def step(t):  # as inside a train_step
        return random_masking(t, 0.5, gen)[3]

    assert not np.array_equal(step(tokens), step(tokens))


def test_patchify_roundtrip():
    x = rand(2, 16, 8, 12, 2)
    patches = patchify(x, (8, 4, 4))
    assert tuple(patches.shape) == (2, 2 * 2 * 3, 8 * 4 * 4 * 2)
    np.testing.assert_array_equal(patches[0, 0], x[0, :8, :4, :4, :].reshape(-1))
    np.testing.assert_array_equal(patches[1, 4], x[1, :8, 4:8, 4:8, :].reshape(-1))
    back = unpatchify(patches, (8, 4, 4), (2, 2, 3), channels=2)
    np.testing.assert_array_equal(np.asarray(back), x)


# ---------------------------------------------------------------------------
# Hybrid encoder
# ---------------------------------------------------------------------------

def test_hybrid_shapes_and_masked_path():
    enc = tiny_hybrid()
    x = rand(2, 32, 32, 16, 1)
    pyramid, fmap = enc.cnn_features(x)
    assert [tuple(p.shape[1:4]) for p in pyramid] == [(32, 32, 16), (16, 16, 8), (8, 8, 4),
                                                     (4, 4, 2)]
    assert tuple(fmap.shape) == (2, 2, 2, 1, enc.cnn_channels) and enc.stride == 16
    tokens, grid = enc.tokens(fmap)
    assert grid == (2, 2, 1) and tuple(tokens.shape) == (2, 4, 24)
    _, token_mask, ids_restore, ids_keep = random_masking(tokens, 0.5, seed=1)
    latent = enc.encode_tokens(tokens, ids_keep)
    assert tuple(latent.shape) == (2, 2, 24)
    pred = enc.decode_tokens(latent, ids_restore, grid)
    assert tuple(pred.shape) == (2, 4, enc.cnn_channels) == (2, 4, 64)
    assert tuple(map_to_tokens(fmap).shape) == (2, 4, 64)
    out = enc(x)
    assert tuple(out["prediction"].shape) == (2, 4, 64)
    assert tuple(out["latent"].shape) == (2, 4, 24)
    assert enc.cnn.get_layer("enc5").filters == [64, 64]


def test_hybrid_gradients_reach_transformer_and_projection():
    enc = tiny_hybrid()
    x = rand(1, 32, 32, 32, 1)
    with tf.GradientTape() as tape:
        _, fmap = enc.cnn_features(x, training=True)
        tokens, grid = enc.tokens(fmap)
        _, token_mask, ids_restore, ids_keep = random_masking(tokens, 0.75, seed=2)
        latent = enc.encode_tokens(tokens, ids_keep, training=True)
        pred = enc.decode_tokens(latent, ids_restore, grid, training=True)
        target = tf.stop_gradient(map_to_tokens(fmap))
        err = tf.reduce_mean(tf.square(pred - target), axis=-1)
        loss = tf.reduce_sum(err * token_mask) / tf.reduce_sum(token_mask)
    variables = (enc.transformer.trainable_variables + enc.proj.trainable_variables
                 + enc.decoder.trainable_variables)
    grads = tape.gradient(loss, variables)
    assert all(g is not None for g in grads)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[:4])
    paths = [v.path for v in enc.weights]
    assert "hybrid_encoder/proj/kernel" in paths
    assert "hybrid_encoder/cnn/enc5/unit2/conv/kernel" in paths
    assert "hybrid_encoder/transformer/block1/attn/query/kernel" in paths
    assert "hybrid_encoder/decoder/mask_token" in paths


def test_hybrid_mixed_precision_policy_reaches_sublayers():
    enc = tiny_hybrid(depth=1, dtype="mixed_bfloat16")
    out = enc(rand(1, 16, 16, 16, 1))
    assert all(keras.backend.standardize_dtype(t.dtype) == "bfloat16"
               for t in (out["feature_map"], out["latent"], out["prediction"]))
    assert all(v.dtype == "float32" for v in enc.weights)


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------

def test_heads_shapes():
    fmap = rand(2, 4, 4, 4, 16)
    proj = ProjectionHead(hidden_dim=32, out_dim=8)
    assert tuple(proj(fmap).shape) == (2, 8)
    assert tuple(ProjectionHead(32, 8, use_bn=False)(rand(3, 16)).shape) == (3, 8)
    pred = PredictorHead()
    assert tuple(pred(rand(4, 16), training=True).shape) == (4, 16)
    assert tuple(pred.fc1.kernel.shape) == (16, 32) and tuple(pred.fc2.kernel.shape) == (32, 16)
    assert pred.bn.epsilon == 1e-5 and pred.bn.momentum == 0.9
    assert tuple(PredictorHead(out_dim=8)(fmap).shape) == (2, 8)
    rec = ReconstructionHead(factor=4)
    assert tuple(rec(rand(2, 4, 4, 2, 16)).shape) == (2, 16, 16, 8, 1)
    assert rec.compute_output_shape((None, 4, 4, 2, 16)) == (None, 16, 16, 8, 1)


def test_reconstruction_head_interpolation():
    x = rand(1, 3, 4, 2, 5)
    tri = ReconstructionHead(factor=2)
    out = np.asarray(tri(x))
    conv = np.asarray(tri.conv(x))
    ref = interpolate_pos_embed(conv.reshape(-1, 1), (3, 4, 2), (6, 8, 4)).reshape(1, 6, 8, 4, 1)
    np.testing.assert_allclose(out, ref, atol=1e-5)  # trilinear, half-pixel centres
    near = ReconstructionHead(factor=2, interpolation="nearest", activation="sigmoid")
    out = np.asarray(near(x))
    conv = 1 / (1 + np.exp(-np.asarray(near.conv(x))))
    ref = conv.repeat(2, 1).repeat(2, 2).repeat(2, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_upsample3d_matches_resize_and_reference():
    x = rand(2, 3, 2, 4, 3)
    for f in (2, 3):
        up = np.asarray(upsample3d(x, f))
        np.testing.assert_allclose(up, np.asarray(resize3d(x, (3 * f, 2 * f, 4 * f))),
                                   atol=1e-5)
        ref = interpolate_pos_embed(x[1].reshape(-1, 3), (3, 2, 4), (3 * f, 2 * f, 4 * f))
        np.testing.assert_allclose(up[1].reshape(-1, 3), ref, atol=1e-5)
    aniso = upsample3d(x, (1, 2, 4), "nearest")
    np.testing.assert_array_equal(aniso, x.repeat(2, 2).repeat(4, 3))


def test_graph_with_unknown_spatial_size():
    """Export-style tf.function with None spatial dims (sliding window, serving)."""
    spec = tf.TensorSpec((None, None, None, None, 1), tf.float32)
    unet = UNet3D(base_width=4, levels=2)
    head = ReconstructionHead(factor=2)
    enc = tiny_hybrid(depth=1)

    @tf.function(input_signature=[spec])
    def run(x):
        return unet(x), head(unet.encode(x)[-1]), enc(x)["prediction"]

    a, b, c = run(tf.zeros((1, 32, 16, 16, 1)))
    assert tuple(a.shape) == (1, 32, 16, 16, 1) and tuple(b.shape) == (1, 32, 16, 16, 1)
    assert tuple(c.shape) == (1, 2, 64)

    @tf.function(input_signature=[tf.TensorSpec((None, None, 6), tf.float32)])
    def mask(t):
        return random_masking(t, 0.75, seed=1)

    visible, token_mask, _, _ = mask(tf.zeros((2, 16, 6)))
    assert tuple(visible.shape) == (2, 4, 6) and float(tf.reduce_sum(token_mask)) == 24


@pytest.mark.parametrize("rank", [2, 3])
def test_max_pool_equals_max_pooling_and_splits_ties_the_same_under_xla(rank):
    """Without ties: keras' max pooling exactly, forward and gradient (an odd
    trailing voxel dropped, as 'valid' pooling does). With ties (a constant
    window, like air clipped to the window): the gradient is split equally,
    and the compiled (XLA) graph gives the same gradient as the plain one,
    where TF's own MaxPool3D gradient gives every tied voxel the whole
    gradient and XLA's only one of them."""
    shape = (2,) + (9, 6, 4)[:rank] + (3,)
    x = tf.constant(np.random.default_rng(0).permutation(np.prod(shape)).reshape(shape),
                    tf.float32)  # distinct values: no ties
    ref = (keras.layers.MaxPooling3D if rank == 3 else keras.layers.MaxPooling2D)(2)
    pool = MaxPool(rank)

    def grad(layer, inp, jit=False):
        def g(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                y = layer(v)
                # distinct upstream gradients: where each one lands is visible
                s = tf.reduce_sum(y * tf.reshape(tf.range(tf.size(y), dtype=y.dtype), y.shape))
            return y, tape.gradient(s, v)
        return tf.function(g, jit_compile=jit)(inp) if jit else g(inp)

    y_ref, g_ref = grad(ref, x)
    y, g = grad(pool, x)
    assert tuple(pool.compute_output_shape(shape)) == tuple(y_ref.shape)
    np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
    np.testing.assert_array_equal(g.numpy(), g_ref.numpy())
    # ties: one constant window per sample -> equal shares, in both graphs
    tied = np.zeros(shape, np.float32)
    tied[(slice(None),) + (slice(0, 2),) * rank] = 5.0
    y, g = grad(pool, tf.constant(tied))
    _, g_xla = grad(pool, tf.constant(tied), jit=True)
    np.testing.assert_allclose(g.numpy(), g_xla.numpy(), rtol=1e-6)
    assert float(y.numpy()[(0,) + (0,) * rank + (1,)]) == 5.0
    # the first window of channel 1 (upstream gradient 1): equal shares summing to 1
    window = g.numpy()[(0,) + (slice(0, 2),) * rank + (1,)]
    np.testing.assert_allclose(window, 1.0 / 2 ** rank, rtol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_xla_gradient_is_as_close_to_float64_as_the_plain_graphs(norm):
    """Why XLA's and the plain graph's first updates differ by percents
    (docs/gpu.md): on CT-like input (a noisy body in exact zeros) the
    gradient of a normalised encoder's kernels is a sum of large terms that
    nearly cancel, so float32 carries about 1 % of rounding error in *both*
    graphs. Against a float64 reference with the same weights, XLA's
    gradient is no further off than the plain graph's (measured here: XLA
    0.15 % vs plain 1.2 % with BatchNorm, 0.003 % vs 0.21 % with
    GroupNorm)."""
    rng = np.random.default_rng(0)
    x = np.zeros((4, 32, 32, 32, 1))
    x[:, 8:24, 6:26, 4:28] = 0.5 + 0.05 * rng.standard_normal((4, 16, 20, 24, 1))
    w = rng.standard_normal((16, 1))
    first = []

    def grads(dtype, jit):
        keras.utils.set_random_seed(1)
        net = UNet3D(base_width=2, levels=3, norm=norm, encoder_only=True, dtype=dtype)
        net.build(x.shape)
        if not first:
            first.extend(v.numpy().astype(np.float64) for v in net.variables)
        for v, a in zip(net.variables, first):
            v.assign(a.astype(dtype))
        xx, ww = tf.constant(x, dtype), tf.constant(w, dtype)

        def f(inp):
            with tf.GradientTape() as tape:
                pooled = tf.reduce_mean(net.encode(inp, training=True)[-1], axis=[1, 2, 3])
                loss = tf.reduce_sum(tf.sin(pooled @ ww[:pooled.shape[-1]]))
            return tape.gradient(loss, net.trainable_variables)

        g = (tf.function(f, jit_compile=True) if jit else f)(xx)
        return np.concatenate([a.numpy().astype(np.float64).ravel()
                               for v, a in zip(net.trainable_variables, g) if "bias" not in v.path])

    ref = grads("float64", False)
    err = {jit: np.linalg.norm(grads("float32", jit) - ref) / np.linalg.norm(ref)
           for jit in (False, True)}
    assert err[False] < 0.05 and err[True] <= 2.0 * err[False] + 1e-4, err


# ---------------------------------------------------------------------------
# .keras round trips of every registered class
# ---------------------------------------------------------------------------

def _dec_call(layer, x):
    return layer(x, np.array([[3, 0, 1, 2]], dtype="int32"), grid=(1, 2, 2))


ROUND_TRIPS = {
    "ConvUnit": (lambda: ConvUnit(4, norm="group"), (1, 8, 8, 8, 2), None),
    "ConvBlock": (lambda: ConvBlock((4, 6), norm="batch"), (1, 8, 8, 8, 2), None),
    "PatchEmbedding3D": (lambda: PatchEmbedding3D((4, 4, 2), 6), (1, 8, 8, 8, 1), None),
    "MLP": (lambda: MLP(12, 5, dropout=0.1), (2, 3, 6), None),
    "TransformerBlock": (lambda: TransformerBlock(8, 2), (2, 5, 8), None),
    "TransformerEncoder": (lambda: TransformerEncoder(8, 2, 2, mlp_ratio=2), (2, 5, 8), None),
    "MaskedTokenDecoder": (lambda: MaskedTokenDecoder(12, 1, 2, 7), (1, 2, 6), _dec_call),
    "MaxPool": (lambda: MaxPool(3), (1, 8, 8, 6, 2), None),
    "UNet3D": (lambda: UNet3D(base_width=4, levels=3, norm="batch", final_activation="sigmoid"),
               (1, 16, 16, 16, 1), None),
    "UNet3D-enc": (lambda: UNet3D(base_width=4, levels=2, norm="instance",
                                  extra_stride_stage=True, encoder_only=True),
                   (1, 16, 16, 16, 1), None),
    "ViT3D": (lambda: ViT3D(patch_size=8, dim=12, depth=1, heads=2), (1, 16, 16, 16, 1), None),
    "HybridEncoder": (lambda: tiny_hybrid(depth=1), (1, 32, 32, 16, 1), None),
    "ProjectionHead": (lambda: ProjectionHead(12, 6), (2, 4, 4, 4, 8), None),
    "PredictorHead": (lambda: PredictorHead(), (2, 8), None),
    "ReconstructionHead": (lambda: ReconstructionHead(2, activation="sigmoid"),
                           (1, 4, 4, 4, 8), None),
}


@pytest.mark.parametrize("key", sorted(ROUND_TRIPS))
def test_keras_roundtrip(key, tmp_path):
    make, shape, call = ROUND_TRIPS[key]
    obj = make()
    x = rand(*shape, seed=3)
    run = call or (lambda layer, inp: layer(inp))
    if call is None:  # move BN statistics off their initial values
        obj(x, training=True)
    before = keras.tree.map_structure(np.asarray, run(obj, x))
    path = str(tmp_path / f"{key}.keras")
    keras.saving.save_model(obj, path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(obj) and loaded.get_config() == obj.get_config()
    assert [w.path for w in loaded.weights] == [w.path for w in obj.weights]
    for a, b in zip(obj.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after = keras.tree.map_structure(np.asarray, run(loaded, x))
    keras.tree.map_structure(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                             before, after)
