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
