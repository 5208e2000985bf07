"""Export the transferable parts of a pre-training run.

  python launch/export.py --run_dir=runs/demo_reprec [--output=DIR]

Writes, per part (RepRec: cnn_encoder, hybrid_encoder), a ``.keras`` file
and a TF SavedModel whose serving signature takes a float32 volume
[B, D, H, W, 1] of any size (multiples of 16 for RepRec) and returns the
feature maps; the preprocessing spec travels inside. Pre-training runs
this itself at the end unless --noexport.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402

flagutil.quiet_tensorflow(__name__)

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A pre-training run directory.")
flags.DEFINE_string("output", None, "Where to write (default: RUN_DIR/export).")
flags.mark_flag_as_required("run_dir")


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    from rr_tf.errors import RrTfError
    from rr_tf.export import export_method
    from rr_tf.runs import load_trained
    from rr_tf.training.run_dir import RunDir

    if not os.path.isdir(FLAGS.run_dir):
        flagutil.fail(__file__, f"--run_dir={FLAGS.run_dir}: no such directory")
    try:
        method, spec = load_trained(FLAGS.run_dir)
        out = FLAGS.output or RunDir(FLAGS.run_dir).export
        crop = tuple(RunDir(FLAGS.run_dir).state()["crop_size"])
        paths = export_method(method, out, spec, sample=method.example_batch(crop, 1))
    except RrTfError as err:
        flagutil.fail(__file__, str(err))
    for name, (keras_path, saved) in sorted(paths.items()):
        print(f"{name}: {keras_path} and {saved}")


if __name__ == "__main__":
    flagutil.main(__file__, main)
