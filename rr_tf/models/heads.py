"""Heads shared by the pre-training methods: projection MLP, PCRLv2 predictor,
1-channel reconstruction head with upsampling to full size."""

import keras
from keras import ops

from rr_tf.models.layers import (BN_EPSILON, BN_MOMENTUM, register, upsample3d,
                                 with_channels)


def _bn(name, dtype):
    # Heads normalise over the *global* batch (synchronized across replicas,
    # a no-op on one device): contrastive and SimSiam objectives then do not
    # depend on how the batch is split, and 1 vs N replicas train alike.
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                           synchronized=True, name=name, dtype=dtype)


def global_pool(x):
    """Global average over the spatial axes of a 5D map; other ranks pass through."""
    return ops.mean(x, axis=(1, 2, 3)) if len(x.shape) == 5 else x


def _pooled_shape(shape):
    shape = tuple(shape)
    return (shape[0], shape[-1]) if len(shape) == 5 else shape


@register
class ProjectionHead(keras.layers.Layer):
    """(GAP if 5D) -> ``fc1`` Dense(hidden) -> ``bn`` -> ReLU -> ``fc2`` Dense(out).

    ``use_bn=False`` gives the PCRL / MoCo v2 head (Dense-ReLU-Dense).
    """

    def __init__(self, hidden_dim=512, out_dim=128, use_bn=True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim, self.out_dim, self.use_bn = int(hidden_dim), int(out_dim), bool(use_bn)
        dt = self.dtype_policy
        self.fc1 = keras.layers.Dense(self.hidden_dim, name="fc1", dtype=dt)
        self.bn = _bn("bn", dt) if self.use_bn else None
        self.fc2 = keras.layers.Dense(self.out_dim, name="fc2", dtype=dt)

    def build(self, input_shape):
        shape = _pooled_shape(input_shape)
        self.fc1.build(shape)
        hidden = with_channels(shape, self.hidden_dim)
        if self.bn is not None:
            self.bn.build(hidden)
        self.fc2.build(hidden)
        self.built = True

    def call(self, x, training=False):
        x = self.fc1(global_pool(x))
        if self.bn is not None:
            x = self.bn(x, training=training)
        return self.fc2(ops.relu(x))

    def compute_output_shape(self, input_shape):
        return with_channels(_pooled_shape(input_shape), self.out_dim)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, out_dim=self.out_dim, use_bn=self.use_bn)
        return config


@register
class PredictorHead(keras.layers.Layer):
    """PCRLv2 predictor: (GAP if 5D) -> Dense(2C) -> BN -> ReLU -> Dense(C).

    ``out_dim`` defaults to the input width C, ``hidden_dim`` to ``2 * out_dim``.
    """

    def __init__(self, out_dim=None, hidden_dim=None, **kwargs):
        super().__init__(**kwargs)
        self.out_dim = None if out_dim is None else int(out_dim)
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self.fc1 = self.bn = self.fc2 = None

    def build(self, input_shape):
        shape = _pooled_shape(input_shape)
        out_dim = self.out_dim or int(shape[-1])
        hidden = self.hidden_dim or 2 * out_dim
        dt = self.dtype_policy
        self.fc1 = keras.layers.Dense(hidden, name="fc1", dtype=dt)
        self.bn = _bn("bn", dt)
        self.fc2 = keras.layers.Dense(out_dim, name="fc2", dtype=dt)
        self.fc1.build(shape)
        self.bn.build(with_channels(shape, hidden))
        self.fc2.build(with_channels(shape, hidden))
        self.built = True

    def call(self, x, training=False):
        x = self.bn(self.fc1(global_pool(x)), training=training)
        return self.fc2(ops.relu(x))

    def compute_output_shape(self, input_shape):
        shape = _pooled_shape(input_shape)
        return with_channels(shape, self.out_dim or shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(out_dim=self.out_dim, hidden_dim=self.hidden_dim)
        return config


@register
class ReconstructionHead(keras.layers.Layer):
    """``conv`` 1x1x1 to ``out_channels`` (default 1), then upsample the
    spatial size by the integer ``factor`` ("trilinear" or "nearest"),
    then an optional activation."""

    def __init__(self, factor=1, out_channels=1, interpolation="trilinear", activation=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)
        self.out_channels = int(out_channels)
        if interpolation not in ("trilinear", "nearest"):
            raise ValueError(f"interpolation must be trilinear or nearest, got {interpolation}")
        self.interpolation = interpolation
        self.activation = activation
        self.conv = keras.layers.Conv3D(self.out_channels, 1, name="conv",
                                        dtype=self.dtype_policy)

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.built = True

    def call(self, x):
        x = self.conv(x)
        if self.factor != 1:
            x = upsample3d(x, self.factor, self.interpolation)
        if self.activation is not None:
            x = keras.activations.get(self.activation)(x)
        return x

    def compute_output_shape(self, input_shape):
        spatial = tuple(None if s is None else s * self.factor for s in input_shape[1:4])
        return (input_shape[0],) + spatial + (self.out_channels,)

    def get_config(self):
        config = super().get_config()
        act = self.activation
        if act is not None and not isinstance(act, (str, dict)):
            act = keras.activations.serialize(act)
        config.update(factor=self.factor, out_channels=self.out_channels,
                      interpolation=self.interpolation, activation=act)
        return config
