"""Segmenters for fine-tuning: shapes, .keras round trips, weight transfer from
each kind of pre-trained network, encoder freezing, factory and method map.

Tiny widths and 32^3 inputs keep the file CPU-cheap.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rr_tf.errors import ConfigError
from rr_tf.models import HybridEncoder, UNet3D, ViT3D
from rr_tf.models.segmenters import (HybridSegmenter, UNETRSegmenter, UNetSegmenter,
                                     build_segmenter, default_skip_blocks,
                                     segmenter_kind_for_method, transfers_decoder)
from rr_tf.transfer import transfer, variables_by_key

SHAPE = (2, 32, 32, 32, 1)
UNET = dict(base_width=2, levels=3)
HYBRID = dict(base_width=2, levels=4, dim=12, depth=2, heads=2)
VIT = dict(patch_size=16, dim=12, depth=3, heads=2)
KINDS = {"unet": UNET, "hybrid": HYBRID, "unetr": dict(VIT, decoder_width=2)}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def randomise(layer, seed=1):
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign((0.5 + rng.random(v.shape)).astype(v.dtype) if "variance" in v.path
                 else rng.normal(0, 0.1, v.shape).astype(v.dtype))


def built(model, shape=(None, 32, 32, 32, 1)):
    model.build(shape)
    return model


def values(variables):
    return [np.array(v) for v in variables]


@pytest.fixture(scope="module")
def models():
    return {kind: build_segmenter(kind, 3, **kw) for kind, kw in KINDS.items()}


# ------------------------------------------------------------- shapes / API
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_output_shape_dtype_and_divisor(models, kind):
    model = models[kind]
    out = model(rand(*SHAPE), training=True)
    assert tuple(out.shape) == SHAPE[:4] + (3,) and out.dtype == "float32"
    assert model.num_classes == 3
    assert model.divisor == {"unet": 4, "hybrid": 16, "unetr": 16}[kind]
    with pytest.raises(ValueError, match="multiple of"):
        type(model).from_config(model.get_config()).build((1, 32, 32, 18, 1))


def test_unknown_spatial_size_graph(models):
    """Sliding-window / serving style tf.function with None spatial dims."""
    spec = tf.TensorSpec((None, None, None, None, 1), tf.float32)
    for kind, model in models.items():
        fn = tf.function(lambda x, m=model: m(x), input_signature=[spec])
        x = rand(1, 32, 16, 48, 1)
        out = fn(x)
        assert tuple(out.shape) == (1, 32, 16, 48, 3), kind
        np.testing.assert_allclose(out, model(x), atol=1e-5)


def test_decoder_layout():
    hyb = built(HybridSegmenter(2, **HYBRID))
    # bottleneck = transformer tokens on the 2^3 grid; skips at strides 8..1
    assert [u.name for u in hyb.ups] == ["up8", "up4", "up2", "up1"]
    assert [u.filters for u in hyb.ups] == [32, 16, 8, 4]   # decoder_width (= 2 base) * stride
    assert tuple(hyb.ups[0].up.kernel.shape) == (2, 2, 2, 32, 12)  # from dim 12
    assert tuple(hyb.ups[0].block.units[0].conv.kernel.shape)[-2:] == (32 + 32, 32)  # + enc4
    assert not hyb.hybrid.decoder.weights  # the recovery decoder is never built
    unetr = built(UNETRSegmenter(2, **VIT))
    assert default_skip_blocks(12, 3) == [3, 6, 9] and unetr.skip_blocks == [1, 2, 3]
    assert [p.name for p in unetr.skip_paths] == ["skip2", "skip4", "skip8"]
    assert [p.steps for p in unetr.skip_paths] == [3, 2, 1]
    assert [u.name for u in unetr.ups] == ["up8", "up4", "up2", "up1"]
    assert [u.filters for u in unetr.ups] == [128, 64, 32, 16]


def test_unetr_skip_blocks_are_the_chosen_hidden_states():
    """With skip_blocks=[1] (patch 4: one skip at stride 2), block 1's output
    feeds skip2; changing block 2's weights must not change skip2's input."""
    m = built(UNETRSegmenter(2, patch_size=4, dim=12, depth=2, heads=2, decoder_width=2,
                             skip_blocks=[1]), (None, 8, 8, 8, 1))
    x = rand(1, 8, 8, 8, 1)
    seen = []
    path = m.skip_paths[0]
    orig = path.call
    path.call = lambda h, training=False: (seen.append(np.array(h)), orig(h, training))[1]
    m(x)
    tokens, grid = m.vit.embed(x)
    h1 = m.vit.encoder.blocks[0](tokens)
    np.testing.assert_allclose(seen[0].reshape(1, -1, 12), np.array(h1), atol=1e-5)
    assert seen[0].shape == (1, 2, 2, 2, 12)


def test_mixed_precision_logits_are_float32():
    m = UNETRSegmenter(2, dtype="mixed_bfloat16", **dict(VIT, depth=1, decoder_width=2))
    out = m(rand(1, 32, 32, 32, 1))
    assert out.dtype == "float32" and m.head.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in m.weights)


# ------------------------------------------------------------- .keras
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_keras_roundtrip(models, kind, tmp_path):
    model = models[kind]
    x = rand(*SHAPE, seed=3)
    model(x, training=True)  # move BatchNorm statistics
    before = np.array(model(x))
    path = str(tmp_path / f"{kind}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    np.testing.assert_array_equal(np.array(loaded(x)), before)
    assert [v.path for v in loaded.encoder_variables()] == \
        [v.path for v in model.encoder_variables()]


# ------------------------------------------------------------- transfer
def test_unet_from_encoder_only_source():  # MoCo / SimCLR / PGL
    src = built(UNet3D(encoder_only=True, **UNET))
    randomise(src)
    seg = built(UNetSegmenter(3, **UNET))
    report = transfer(seg.transfer_parts(), {"unet": src}, source="moco")
    assert sorted(report.matched) == sorted(f"unet/{k}" for k in variables_by_key(src))
    assert report.missing and all(k.split("/")[1][:2] in ("up", "de", "he")
                                  for k in report.missing)
    assert not report.shape_mismatch and not report.unexpected
    x = rand(1, 32, 32, 32, 1)
    for a, b in zip(src(x), seg.unet.encode(x)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_unet_from_genesis_skip_unet_head_is_a_mismatch():  # Genesis / PCRL
    src = built(UNet3D(out_channels=1, final_activation="sigmoid", **UNET))
    randomise(src)
    seg = built(UNetSegmenter(3, **UNET))
    head_before = values([seg.unet.head.kernel, seg.unet.head.bias])
    report = transfer(seg.transfer_parts(), {"unet": src})
    assert sorted(report.shape_mismatch) == [
        "unet/head/bias: model (3,) vs source (1,)",
        "unet/head/kernel: model (1, 1, 1, 4, 3) vs source (1, 1, 1, 4, 1)"]
    assert not report.missing and not report.unexpected
    assert len(report.matched) == len(variables_by_key(src)) - 2
    for a, b in zip(head_before, [seg.unet.head.kernel, seg.unet.head.bias]):
        np.testing.assert_array_equal(a, b)  # the head stays fresh
    x = rand(1, 32, 32, 32, 1)
    for a, b in zip(src.decode(src.encode(x))[0], seg.unet.decode(seg.unet.encode(x))[0]):
        np.testing.assert_allclose(a, b, atol=1e-5)  # decoder stages identical


def test_unet_from_pcrlv2_non_skip_unet():
    src = built(UNet3D(skips=False, **UNET))
    randomise(src)
    enc_keys = {f"unet/{k}" for k in variables_by_key(src) if k.startswith("enc")}
    # whole U-Net: the first unit after each concatenation (and the head) differ
    # in shape, while up* and the second units would load
    seg = built(UNetSegmenter(3, **UNET))
    report = transfer(seg.transfer_parts(), {"unet": src})
    assert sorted(k.split(":")[0] for k in report.shape_mismatch) == [
        "unet/dec1/unit1/conv/kernel", "unet/dec2/unit1/conv/kernel", "unet/head/bias",
        "unet/head/kernel"]
    assert "unet/up2/kernel" in report.matched and "unet/dec1/unit2/conv/kernel" in report.matched
    assert enc_keys < set(report.matched)
    # PCRLv2's published transfer: the encoder only; its decoder is reported unused
    assert not transfers_decoder("pcrlv2") and transfers_decoder("genesis")
    seg = built(UNetSegmenter(3, **UNET))
    decoder = [v for layer in seg.unet.decoder_layers + [seg.unet.head] for v in layer.weights]
    dec_before = values(decoder)
    report = transfer(seg.transfer_parts(decoder=False), {"unet": src})
    assert set(report.matched) == enc_keys and not report.shape_mismatch
    assert report.unexpected and all(k.split("/")[1][:2] in ("up", "de", "he")
                                     for k in report.unexpected)
    for a, b in zip(dec_before, decoder):
        np.testing.assert_array_equal(a, b)


def test_unet_from_reprec_cnn():
    src = HybridEncoder(decoder_dim=8, decoder_depth=1, decoder_heads=2, **HYBRID)
    built(src)
    randomise(src)
    seg = built(UNetSegmenter(3, base_width=2, levels=4))
    report = transfer(seg.transfer_parts(), {"hybrid": src, "unet": src.cnn})
    matched_stages = sorted({k.split("/")[1] for k in report.matched})
    assert matched_stages == ["enc1", "enc2", "enc3", "enc4"]
    assert {k.split("/")[1] for k in report.unexpected if k.startswith("unet/")} == {"enc5"}
    assert not report.shape_mismatch


def test_hybrid_from_reprec_encoder():
    src = HybridEncoder(decoder_dim=8, decoder_depth=1, decoder_heads=2, **HYBRID)
    built(src)
    randomise(src)
    seg = built(HybridSegmenter(3, **HYBRID))
    report = transfer(seg.transfer_parts(), {"hybrid": src, "unet": src.cnn})
    src_keys = variables_by_key(src)
    # every CNN / proj / transformer variable once (the unet part shares them)
    assert sorted(report.matched) == sorted(f"hybrid/{k}" for k in src_keys
                                            if not k.startswith("decoder/"))
    assert sorted(report.unexpected) == sorted(f"hybrid/{k}" for k in src_keys
                                               if k.startswith("decoder/"))
    assert not report.missing and not report.shape_mismatch
    x = rand(1, 32, 32, 32, 1)
    np.testing.assert_allclose(seg.hybrid(x)["latent"], src(x)["latent"], atol=1e-5)


def test_unetr_from_vit():  # MAE
    src = built(ViT3D(**VIT))
    randomise(src)
    seg = built(UNETRSegmenter(3, decoder_width=2, **VIT))
    report = transfer(seg.transfer_parts(), {"vit": src})
    assert sorted(report.matched) == sorted(f"vit/{k}" for k in variables_by_key(src))
    assert not (report.missing or report.unexpected or report.shape_mismatch)
    x = rand(1, 32, 32, 32, 1)
    np.testing.assert_allclose(seg.vit(x), src(x), atol=1e-5)
    with pytest.raises(ConfigError, match="no variable matches"):
        transfer(seg.transfer_parts(), {"vit": built(ViT3D(**dict(VIT, dim=6)))})


# ------------------------------------------------------------- freezing
@pytest.mark.parametrize("kind", ["unet", "hybrid"])
def test_frozen_encoder_is_unchanged_by_a_training_step(kind):
    model = build_segmenter(kind, 3, **KINDS[kind])
    x = rand(*SHAPE)
    y = keras.ops.one_hot(np.random.default_rng(0).integers(0, 3, SHAPE[:4]), 3)
    model(x)
    enc = model.encoder_variables()
    trainable = {id(v) for v in model.trainable_variables}
    assert enc and {id(v) for v in enc} < trainable
    enc_layers = model._encoder_layers()
    enc_all = [v for layer in enc_layers for v in layer.weights]  # with BN statistics
    assert len(enc_all) > len(enc)

    model.freeze_encoder(True)
    assert model.encoder_frozen
    assert [v.path for v in model.encoder_variables()] == [v.path for v in enc]
    assert not {id(v) for v in enc} & {id(v) for v in model.trainable_variables}
    rest = model.trainable_variables
    enc_before, rest_before = values(enc_all), values(rest)
    opt = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.categorical_crossentropy(
            y, model(x, training=True), from_logits=True))
    opt.apply_gradients(zip(tape.gradient(loss, rest), rest))
    for a, v in zip(enc_before, enc_all):
        np.testing.assert_array_equal(a, np.array(v), err_msg=v.path)
    changed = [not np.array_equal(a, np.array(v)) for a, v in zip(rest_before, rest)]
    assert sum(changed) >= len(rest) // 2  # the decoder and head did train

    model.freeze_encoder(False)
    assert not model.encoder_frozen
    assert {id(v) for v in model.trainable_variables} == trainable


def test_encoder_variables_of_unetr_are_the_vit(models):
    m = models["unetr"]
    assert [v.path for v in m.encoder_variables()] == [v.path for v in m.vit.trainable_weights]
    assert len(m.encoder_variables()) < len(m.trainable_variables)


# ------------------------------------------------------------- factory
def test_factory_and_method_map():
    assert isinstance(build_segmenter("unet", 2, base_width=2, levels=2), UNetSegmenter)
    with pytest.raises(ConfigError, match="unknown kind 'swin'"):
        build_segmenter("swin", 2)
    with pytest.raises(ConfigError, match="segmenter: unet: .*skips"):
        build_segmenter("unet", 2, skips=False)
    with pytest.raises(ConfigError, match="num_classes"):
        build_segmenter("unet", 1)
    with pytest.raises(ConfigError, match="heads: must divide dim"):
        build_segmenter("hybrid", 2, dim=12, heads=5)
    with pytest.raises(ConfigError, match="patch_size"):
        build_segmenter("unetr", 2, patch_size=12)
    with pytest.raises(ConfigError, match="skip_blocks"):
        build_segmenter("unetr", 2, depth=2, skip_blocks=[1, 3, 2])
    with pytest.raises(ConfigError, match="norm"):
        build_segmenter("unet", 2, norm="layer")
    expected = {"reprec": "hybrid", "mae": "unetr", "moco": "unet", "simclr": "unet",
                "genesis": "unet", "pcrl": "unet", "pcrlv2": "unet", "pgl": "unet",
                "multitask": "slice2d"}
    assert {m: segmenter_kind_for_method(m) for m in expected} == expected
    with pytest.raises(ConfigError, match="method"):
        segmenter_kind_for_method("byol")


# ------------------------------------------------------------- deep supervision
def test_unet_deep_supervision_heads_give_strided_logits_and_leave_call_alone():
    keras.utils.set_random_seed(4)
    model = build_segmenter("unet", 3, base_width=2, levels=4, deep_supervision=2)
    x = rand(*SHAPE)
    outs = model.deep_outputs(x, training=False)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 32, 3), (2, 16, 16, 16, 3),
                                             (2, 8, 8, 8, 3)]
    assert all(o.dtype == "float32" for o in outs)
    # call (inference, export) is the main head alone
    np.testing.assert_allclose(model(x, training=False), outs[0], atol=1e-6)
    # the heads read the decoder outputs at their stride: the channels of encoder stages 2, 3
    assert [tuple(h.kernel.shape) for h in model.ds_heads] == [(1, 1, 1, 8, 3), (1, 1, 1, 16, 3)]
    # a config round trip keeps the heads, and the same variables load by key
    clone = UNetSegmenter.from_config(model.get_config())
    clone.build((None, 32, 32, 32, 1))
    assert clone.deep_supervision == 2
    assert sorted(variables_by_key(clone)) == sorted(variables_by_key(model))
    # a plain U-Net's variables are a subset: a pre-trained U-Net loads into it unchanged
    plain = built(build_segmenter("unet", 3, base_width=2, levels=4))
    extra = set(variables_by_key(model)) - set(variables_by_key(plain))
    assert extra and all("ds_head" in k for k in extra)


@pytest.mark.parametrize("heads", [-1, 3])
def test_unet_deep_supervision_is_refused_beyond_the_decoder(heads):
    with pytest.raises(ConfigError, match="deep_supervision.*must be in \\[0, 2\\]"):
        build_segmenter("unet", 3, base_width=2, levels=4, deep_supervision=heads)
