"""Models: shared layers, the Genesis 3D U-Net, a 3D ViT, RepRec's hybrid
encoder and the heads used by the pre-training methods.

Backend-agnostic Keras 3 (``keras.layers`` / ``keras.ops`` only),
channels-last ``(batch, D, H, W, C)``. Every public layer and model is
registered under the ``rr_tf`` package for ``.keras`` loading.
"""

from rr_tf.models.heads import PredictorHead, ProjectionHead, ReconstructionHead, global_pool
from rr_tf.models.hybrid import HybridEncoder, map_to_tokens
from rr_tf.models.layers import (BN_EPSILON, BN_MOMENTUM, MLP, NORMS, ConvBlock, ConvUnit,
                                 PatchEmbedding3D, TransformerBlock, TransformerEncoder,
                                 group_count, interpolate_pos_embed, make_norm, resize3d,
                                 sincos_position_embedding_3d, upsample3d,
                                 sincos_position_embedding_3d_numpy)
from rr_tf.models import segmenters, unet2d  # noqa: F401,E402  (registers their classes)
from rr_tf.models.unet3d import UNet3D, unet3d_channels, unet3d_param_count
from rr_tf.models.vit3d import (MaskedTokenDecoder, ViT3D, add_position_embedding,
                                gather_tokens, num_visible, patchify, random_masking,
                                tokens_to_map, unpatchify)

__all__ = [
    "BN_EPSILON", "BN_MOMENTUM", "MLP", "NORMS", "ConvBlock", "ConvUnit", "HybridEncoder",
    "MaskedTokenDecoder", "PatchEmbedding3D", "PredictorHead", "ProjectionHead",
    "ReconstructionHead", "TransformerBlock", "TransformerEncoder", "UNet3D", "ViT3D",
    "add_position_embedding", "gather_tokens", "global_pool", "group_count",
    "interpolate_pos_embed", "make_norm", "map_to_tokens", "num_visible", "patchify",
    "random_masking", "resize3d", "sincos_position_embedding_3d",
    "sincos_position_embedding_3d_numpy", "tokens_to_map", "unet3d_channels",
    "unet3d_param_count", "unpatchify", "upsample3d",
]
