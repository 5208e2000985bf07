"""Exportable parts of pre-trained models: small registered wrappers that
present an encoder as "volume -> named feature maps", the form the
segmenters and the SavedModel serving signature use."""

import keras

from rr_tf.models.vit3d import tokens_to_map


def _stride_names(strides):
    return [f"stride_{s}" for s in strides]


@keras.saving.register_keras_serializable(package="rr_tf")
class CNNPyramid(keras.Model):
    """``UNet3D`` encoder -> dict ``stride_1 .. stride_16`` of feature maps."""

    def __init__(self, cnn, **kwargs):
        kwargs.setdefault("name", "cnn_encoder")
        super().__init__(**kwargs)
        self.cnn = cnn if isinstance(cnn, keras.Layer) else keras.saving.deserialize_keras_object(cnn)

    def call(self, x, training=False):
        pyramid = self.cnn.encode(x, training=training)
        return dict(zip(_stride_names(self.cnn.strides), pyramid))

    def transfer_parts(self):
        return {"unet": self.cnn}

    def get_config(self):
        config = super().get_config()
        config["cnn"] = keras.saving.serialize_keras_object(self.cnn)
        return config


@keras.saving.register_keras_serializable(package="rr_tf")
class HybridFeatures(keras.Model):
    """``HybridEncoder`` -> dict of the CNN skips (``stride_1`` .. ``stride_8``),
    the CNN map at stride 16 (``cnn_stride_16``) and the transformer output
    laid back on the token grid (``transformer_stride_16``, [B, d, h, w, dim])."""

    def __init__(self, encoder, **kwargs):
        kwargs.setdefault("name", "hybrid_features")
        super().__init__(**kwargs)
        self.encoder = (encoder if isinstance(encoder, keras.Layer)
                        else keras.saving.deserialize_keras_object(encoder))

    def call(self, x, training=False):
        skips, fmap = self.encoder.cnn_features(x, training=training)
        tokens, grid = self.encoder.tokens(fmap)
        latent = self.encoder.encode_tokens(tokens, training=training)
        out = dict(zip(_stride_names(self.encoder.cnn.strides[:-1]), skips))
        out["cnn_stride_16"] = fmap
        out["transformer_stride_16"] = tokens_to_map(latent, grid)
        return out

    def transfer_parts(self):
        return {"hybrid": self.encoder, "unet": self.encoder.cnn}

    def get_config(self):
        config = super().get_config()
        config["encoder"] = keras.saving.serialize_keras_object(self.encoder)
        return config


def vit_taps(depth, count=3):
    """Blocks whose hidden states a UNETR-style segmenter takes as skips:
    ``count`` blocks evenly spread over ``depth`` (rounded, duplicates
    dropped), e.g. 3, 6, 9 of 12 (UNETR's z3, z6, z9), 1, 2, 3 of 4, 1, 2 of 2."""
    taps = sorted({max(1, (int(depth) * k * 2 + count + 1) // (2 * (count + 1)))
                   for k in range(1, count + 1)})
    return tuple(t for t in taps if t <= int(depth))


@keras.saving.register_keras_serializable(package="rr_tf")
class ViTFeatures(keras.Model):
    """``ViT3D`` -> dict of token feature maps on the patch grid
    ``[B, D/p, H/p, W/p, dim]``: ``block_{i}`` = the (un-normed) hidden state
    after block ``i`` for each ``i`` in ``taps`` (default :func:`vit_taps`:
    3, 6, 9 for a 12-block ViT), and ``output`` = the final, LayerNormed
    encoder output (UNETR's z12). Every patch is visible (no masking)."""

    def __init__(self, vit, taps=None, **kwargs):
        kwargs.setdefault("name", "vit_features")
        super().__init__(**kwargs)
        self.vit = (vit if isinstance(vit, keras.Layer)
                    else keras.saving.deserialize_keras_object(vit))
        self.taps = tuple(int(t) for t in (taps or vit_taps(self.vit.depth)))
        if not all(1 <= t <= self.vit.depth for t in self.taps):
            raise ValueError(f"taps {self.taps} must lie in 1..{self.vit.depth}")

    def call(self, x, training=False):
        tokens, grid = self.vit.embed(x)
        out, hidden = self.vit.encode_tokens(tokens, training=training, return_hidden_states=True)
        maps = {f"block_{t}": tokens_to_map(hidden[t - 1], grid) for t in self.taps}
        maps["output"] = tokens_to_map(out, grid)
        return maps

    def transfer_parts(self):
        return {"vit": self.vit}

    def get_config(self):
        config = super().get_config()
        config["vit"] = keras.saving.serialize_keras_object(self.vit)
        config["taps"] = list(self.taps)
        return config


@keras.saving.register_keras_serializable(package="rr_tf")
class UNetFeatures(keras.Model):
    """A whole ``UNet3D`` (encoder *and* decoder, e.g. pre-trained by
    restoration: Models Genesis, PCRL) -> dict of its encoder pyramid
    ``stride_1 .. stride_8``, its decoder stages ``decoder_stride_4 ..
    decoder_stride_1`` (coarse to fine) and the head's ``output``."""

    def __init__(self, unet, **kwargs):
        kwargs.setdefault("name", "unet_features")
        super().__init__(**kwargs)
        self.unet = unet if isinstance(unet, keras.Layer) else keras.saving.deserialize_keras_object(unet)
        if self.unet.encoder_only:
            raise ValueError("UNetFeatures needs a UNet3D with its decoder (encoder_only=False)")

    def call(self, x, training=False):
        pyramid = self.unet.encode(x, training=training)
        stages, output = self.unet.decode(pyramid, training=training)
        maps = dict(zip(_stride_names(self.unet.strides), pyramid))
        for stride, stage in zip(self.unet.strides[-2::-1], stages):
            maps[f"decoder_stride_{stride}"] = stage
        maps["output"] = output
        return maps

    def transfer_parts(self):
        return {"unet": self.unet}

    def get_config(self):
        config = super().get_config()
        config["unet"] = keras.saving.serialize_keras_object(self.unet)
        return config
