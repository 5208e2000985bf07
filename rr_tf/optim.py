"""Optimiser helpers shared by the pre-training methods and the training
runs: the optimiser + learning-rate schedule (linear warm-up then cosine
decay; nnU-Net's SGD uses its polynomial decay instead), the replica-scaled
loss and backprop with float16 loss scaling, and the optimizer's step.

Below ``rr_tf.methods`` and ``rr_tf.training`` (imports nothing of either);
light to import: Keras and TensorFlow are imported where they are used, so
the run settings can read :data:`OPTIMIZERS` before TensorFlow starts."""

from rr_tf.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd", "lamb", "nnunet_sgd")  # what build_optimizer builds

# nnU-Net's optimiser: SGD, Nesterov momentum 0.99, lr * (1 - step / steps) ** 0.9
NNUNET_MOMENTUM, NNUNET_POLY_POWER = 0.99, 0.9


def learning_rate_schedule(peak, total_steps, warmup_steps=0):
    import keras

    if warmup_steps >= total_steps:
        raise ConfigError("warmup_steps", f"({warmup_steps}) must be smaller than train_steps "
                          f"({total_steps})")
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total_steps - warmup_steps, warmup_target=peak, warmup_steps=warmup_steps)


def build_optimizer(name, learning_rate, total_steps, weight_decay=0.0, warmup_steps=0,
                    momentum=0.9, mixed_precision="none"):
    """AdamW / SGD (momentum, weight decay) / LAMB with the schedule; wrapped
    in a loss-scale optimizer for float16."""
    import keras

    if name == "nnunet_sgd":
        if warmup_steps:
            raise ConfigError("warmup_steps", "nnunet_sgd uses nnU-Net's polynomial decay from the "
                              "first step; set --warmup_steps=0")
        lr = keras.optimizers.schedules.PolynomialDecay(learning_rate, total_steps, 0.0,
                                                        power=NNUNET_POLY_POWER)
        opt = keras.optimizers.SGD(lr, momentum=NNUNET_MOMENTUM, nesterov=True,
                                   weight_decay=weight_decay or None)
        return keras.optimizers.LossScaleOptimizer(opt) if mixed_precision == "float16" else opt
    lr = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    if name == "adamw":
        opt = keras.optimizers.AdamW(lr, weight_decay=weight_decay)
    elif name == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=momentum, weight_decay=weight_decay or None)
    elif name == "lamb":
        opt = keras.optimizers.Lamb(lr, weight_decay=weight_decay or None)
    else:
        raise ConfigError("optimizer", f"must be one of {OPTIMIZERS}, got {name!r}")
    if mixed_precision == "float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def replica_scaled(loss):
    """``loss`` divided by the number of replicas: under tf.distribute the
    optimizer sums the replicas' gradients, so this gives the gradient of
    the global-batch mean."""
    import tensorflow as tf

    return loss / tf.distribute.get_strategy().num_replicas_in_sync


def backprop(optimizer, tape, loss, variables):
    """Gradients of ``loss`` (already replica-scaled) recorded on ``tape``,
    applied to ``variables``; returns them. With a float16 loss-scale
    optimizer the scaling is recorded on the same tape (re-entered), or the
    gradients would not reach the variables."""
    if hasattr(optimizer, "scale_loss"):
        with tape:
            loss = optimizer.scale_loss(loss)
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return grads


def optimizer_step(model):
    """The model's optimizer step as int32 (0 before it is compiled)."""
    import tensorflow as tf

    if model.optimizer is None:
        return 0
    return tf.cast(model.optimizer.iterations, tf.int32)
