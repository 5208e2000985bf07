"""Self-supervised pre-training on preprocessed CT shards.

  python launch/pretrain.py --flagfile=configs/demo.flags
  python launch/pretrain.py --flagfile=configs/reprec.flags --data_dir=/data/ct_shards \
      --run_dir=/runs/reprec1 [--flagfile=configs/hw/gpu1.flags]

Re-running the same command on an existing --run_dir resumes from its last
checkpoint. Flags named like a method's config fields (see
``rr_tf.methods.<name>.Config``) set those hyper-parameters.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

flagutil.quiet_tensorflow(__name__)

from rr_tf.methods import get_method, method_names  # noqa: E402

FLAGS = flags.FLAGS

# --- run and data
flags.DEFINE_enum("method", None, list(method_names()), "Pre-training method.")
flags.DEFINE_string("data_dir", None, "Shards + manifest.json made by launch/prepare_data.py.")
flags.DEFINE_string("run_dir", None, "Run directory (created; an existing one is resumed).")
flagutil.define_phantom_flags()
# --- schedule, hardware, monitoring, checkpoints: shared with launch/finetune.py
flagutil.define_memory_flag()
flagutil.define_run_flags(helps=dict(
    crop_size="Crop size D,H,W in voxels (each a multiple of 16 for RepRec's stride-16 tokens).",
    export="Export the encoders at the end (launch/export.py).",
    seed="Seed of weights, masking and the data stream."))
flags.DEFINE_enum("pairing", "views", ["views", "patient"], "Two-view contrastive methods: both "
                  "views from one scan (views), or from two scans of one patient when the manifest "
                  "links several (patient = MICLe; a lone scan falls back to two views of itself).")
flags.DEFINE_string("init_from", None, "Start from the weights of this run directory or "
                    "checkpoint (HPT); heads are reset.")
flags.DEFINE_integer("probe_every", 500, "Frozen-feature probe every N steps (and at step 0 and "
                     "the end): a linear classifier of the organ labels on the transferable "
                     "encoder's frozen features of a few labelled patches, scored on other cases; "
                     "logged as probe/* in TensorBoard, probe.json and metrics.json. 0 = off; "
                     "skipped with a note when the shards hold fewer than two labelled cases.",
                     lower_bound=0)
flags.DEFINE_integer("probe_patches", 8, "Probe: labelled patches (crop size) to fit on, and as "
                     "many of other cases to score on; its cost grows with this.", lower_bound=1)

# --- method hyper-parameters: one flag per field of the methods' Config
# dataclasses (same name), default = the chosen method's published value
METHOD_FLAGS = flagutil.define_config_flags({m: get_method(m).Config for m in method_names()})

flags.mark_flags_as_required(["method", "data_dir", "run_dir"])


def method_config(cls):
    """The method's Config: its published defaults, overridden by the
    hyper-parameter flags given (a flag of another method is an error)."""
    return flagutil.config_from_flags(FLAGS.method, cls.Config, METHOD_FLAGS)


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    from rr_tf.training.pretrain import PretrainConfig, run_pretraining

    def job():
        cls = get_method(FLAGS.method)
        config = PretrainConfig(
            method=FLAGS.method, data_dir=FLAGS.data_dir, run_dir=FLAGS.run_dir,
            method_config=method_config(cls), pairing=FLAGS.pairing, init_from=FLAGS.init_from,
            probe_every=FLAGS.probe_every, probe_patches=FLAGS.probe_patches,
            **flagutil.run_settings(__file__, sorted(METHOD_FLAGS)))
        config.validate()  # bad flag values are named before any data is generated
        cls.check_config(config.method_config, config)
        flagutil.ensure_phantom_data(FLAGS.data_dir)
        run_pretraining(config)

    flagutil.run_job(__file__, job)


if __name__ == "__main__":
    flagutil.main(__file__, main, flagutil.TRAIN_INTERRUPTED)
