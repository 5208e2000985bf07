"""What every pre-training method shares: metric trackers, loss scaling for
tf.distribute, and the hooks the training loop and export use."""

import keras
import tensorflow as tf


class PretrainMethod(keras.Model):
    """Base class: a keras.Model whose ``train_step`` implements a pretext task.

    Subclasses define:
      - ``Config``: a dataclass of hyper-parameters;
      - ``recipe(config, crop_size)``: the data recipe feeding ``train_step``;
      - ``build_for(batch)``: create every variable from one batch;
      - ``train_step(batch)``: returns ``self.report(...)``;
      - ``summary_images(batch)``: name -> images [N, H, W, C] in [0, 1];
      - ``export_parts()``: name -> keras model of each transferable part.
    """

    metric_names = ("loss",)

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self._trackers = {n: keras.metrics.Mean(name=n) for n in self.metric_names}

    @property
    def metrics(self):
        return list(self._trackers.values())

    def report(self, **values):
        """Updates the trackers (mean since the epoch start) and returns
        their results, which Keras logs and TensorBoard records."""
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return {n: t.result() for n, t in self._trackers.items()}

    @staticmethod
    def replica_scaled(loss):
        """Divides by the number of replicas: under tf.distribute the
        optimizer sums the replicas' gradients."""
        return loss / tf.distribute.get_strategy().num_replicas_in_sync

    def backprop(self, tape, loss, variables):
        """Backprop ``loss`` (already replica-scaled) into ``variables``
        (handles the float16 loss-scale optimizer)."""
        opt = self.optimizer
        scaled = opt.scale_loss(loss) if hasattr(opt, "scale_loss") else loss
        grads = tape.gradient(scaled, variables)
        opt.apply_gradients(zip(grads, variables))
        return grads
