"""rr_tf: self-supervised pre-training of 3D CT encoders in TensorFlow/Keras."""

__version__ = "0.1.0"
