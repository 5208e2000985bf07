"""Fine-tune a segmenter on labelled shards, from scratch or from pre-trained weights.

  python launch/finetune.py --data_dir=rr_tf_data/phantom_demo --run_dir=runs/ft_reprec \
      --pretrained=runs/demo_reprec --num_labeled=2
  python launch/finetune.py --flagfile=configs/demo_finetune.flags

The segmenter follows the pre-training (RepRec -> hybrid CNN+transformer,
MAE -> UNETR, the CNN methods -> U-Net with skips, multitask -> 2D U-Net
slice by slice) with the pre-trained architecture; without --pretrained it
is a U-Net built from --base_width/--levels/--norm. Re-running the same
command on an existing --run_dir resumes it. The best weights by validation
Dice are exported as a SavedModel with sliding-window inference inside.
With --consistency_weight > 0 the training cases outside --num_labeled feed
a mean-teacher consistency loss (semi-supervised; rr_tf.training.mean_teacher).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from launch import flagutil  # noqa: E402
from rr_tf.training.settings import FINETUNE_DEFAULTS  # noqa: E402  (no TensorFlow)

flagutil.quiet_tensorflow(__name__)

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Labelled shards + manifest.json (launch/prepare_data.py).")
flags.DEFINE_string("run_dir", None, "Run directory (created; an existing one is resumed).")
flagutil.define_phantom_flags()
flags.DEFINE_string("pretrained", None, "Pre-training run directory, export directory or .keras "
                    "file to start from (absent = from scratch).")
flags.DEFINE_list("parts", None, "Load only these parts of --pretrained (unet, hybrid, vit, unet2d).")
flags.DEFINE_boolean("allow_spec_mismatch", False, "Load --pretrained even if it was pre-trained "
                     "on data with another preprocessing spec.")
flags.DEFINE_boolean("load_weights", True, "With --pretrained: false builds its segmenter "
                     "architecture with random weights and loads nothing (the architecture-"
                     "matched from-scratch control of a pre-trained arm).")
flags.DEFINE_enum("segmenter", "auto", ["auto", "unet", "hybrid", "unetr", "slice2d"],
                  "Segmenter kind (auto = what --pretrained transfers into; U-Net from scratch).")
flags.DEFINE_integer("base_width", None, "From scratch: U-Net base width (default 32).", lower_bound=1)
flags.DEFINE_integer("levels", None, "From scratch: U-Net levels (default 4).", lower_bound=2)
flags.DEFINE_enum("norm", None, ["batch", "sync_batch", "group", "instance", "none"],
                  "From scratch: normalisation (default batch).")
flags.DEFINE_integer("decoder_width", None, "Hybrid and UNETR segmenters: decoder channels per "
                     "unit of stride (default: hybrid 2 x base width, UNETR 16); not for unet.",
                     lower_bound=1)
flags.DEFINE_integer("deep_supervision", 0, "U-Net segmenter: extra 1x1x1 heads on the decoder "
                     "outputs at strides 2, 4, ... trained on the subsampled label with weights "
                     "halving per resolution (nnU-Net's deep supervision); 0 = off, at most "
                     "levels - 2. Inference and the export use the main head only.", lower_bound=0)
flagutil.define_memory_flag()
flagutil.define_run_flags(FINETUNE_DEFAULTS, helps=dict(
    crop_size="Patch (and sliding window) size D,H,W.",
    crops_per_volume="Patches cut from each decoded volume.",
    export="Export the best segmenter at the end.",
    seed="Seed of weights, the labelled subset and the data stream."))
flags.DEFINE_string("num_labeled", "all", "Labelled training cases used: 'all', a count N or a "
                    "fraction in (0, 1); chosen reproducibly by --seed.")
flags.DEFINE_float("fg_fraction", 1.0 / 3.0, "Fraction of patches centred on a labelled voxel "
                   "(the rest are uniform random boxes).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("patch_sampling", "class_balanced", ["class_balanced", "foreground"],
                  "How the --fg_fraction patches pick their centre: class_balanced = a class drawn "
                  "uniformly among the organs present in the case, then a voxel of it (nnU-Net); "
                  "foreground = any labelled voxel (large organs dominate).")
flags.DEFINE_string("flip_axes", "none", "Axes the training patches are flipped on (each with "
                    "p 0.5), comma separated, or 'none' (the default: shards are in canonical RAS+ "
                    "orientation, and flips cost held-out Dice at CPU budgets, docs/results.md). "
                    "Axis 0 is left-right: flipping it swaps the sides of left/right organs.")
flags.DEFINE_boolean("intensity_augment", True, "nnU-Net's intensity augmentation of the "
                     "training patches: noise, blur, contrast, gamma.")
flags.DEFINE_float("tissue_shift_hu", 100.0, "Per-organ intensity augmentation: with p 0.5 each "
                   "labelled organ's voxels move by their own offset U(-x, x) HU, as organs "
                   "enhance differently between contrast phases (kidney 30 HU native, 165 "
                   "portal-venous); 0 = off.", lower_bound=0.0)
flags.DEFINE_list("scale_range", ["0.85", "1.2"], "Spatial augmentation: the patch content is "
                  "zoomed by a factor U(LOW, HIGH) (nnU-Net: 0.7,1.4; the default with "
                  "--anisotropy and --elastic_voxels is the measured recipe, docs/results.md).")
flags.DEFINE_float("rotation_degrees", 10.0, "Spatial augmentation: rotations up to +-x degrees "
                   "about each axis (nnU-Net: 30).", lower_bound=0.0, upper_bound=180.0)
flags.DEFINE_float("anisotropy", 0.15, "Spatial augmentation: each axis is zoomed by a further "
                   "factor U(1 - x, 1 + x), for bodies and organs that differ in width and depth "
                   "independently.", lower_bound=0.0, upper_bound=0.49)
flags.DEFINE_float("elastic_voxels", 3.0, "Spatial augmentation: a smooth random displacement "
                   "(a 4x4x4 lattice interpolated over the patch) of up to x voxels; 0 = off.",
                   lower_bound=0.0, upper_bound=16.0)
flags.DEFINE_enum("normalization", "stored", ["stored", "abdomen", "ct"], "Intensity "
                  "normalisation applied when the shards are read (no new shards needed): stored "
                  "= the shards' window mapped to [0, 1]; abdomen = clip to -175..250 HU, then "
                  "[0, 1]; ct = nnU-Net's CT scheme (clip to the 0.5/99.5 percentiles of the "
                  "training set's labelled voxels, z-score with their mean and std, as "
                  "launch/prepare_data.py stores them in the manifest). Carried by the export.")
flags.DEFINE_integer("freeze_encoder_steps", 0, "Keep the pre-trained encoder frozen for the "
                     "first N steps.", lower_bound=0)
flags.DEFINE_list("class_weights", None, "Cross-entropy weight per class (background first).")
flags.DEFINE_integer("val_every", 100, "Steps between validations (sliding-window Dice on the "
                     "labelled validation cases).", lower_bound=1)
flags.DEFINE_float("val_overlap", 0.5, "Sliding-window overlap for validation and export.",
                   lower_bound=0.0, upper_bound=0.95)
flags.DEFINE_integer("val_window_batch", 2, "Windows per forward pass in validation.", lower_bound=1)
flags.DEFINE_integer("val_cases", 0, "Validation volumes used (the first N labelled val cases of "
                     "the manifest; 0 = all).", lower_bound=0)
flags.DEFINE_enum("largest_component", "auto", ["auto", "none", "all"], "Postprocessing the "
                  "export applies by default (launch/infer.py --largest_component overrides): keep "
                  "only each class's largest connected component for auto = the classes where "
                  "that raised the final validation Dice (RUN_DIR/postprocess.json), all, none.")
flags.DEFINE_float("consistency_weight", 0.0, "Semi-supervised mean teacher: weight of the "
                   "consistency loss (MSE between the student's and the EMA teacher's softmax on "
                   "patches of the training cases outside --num_labeled); 0 = off.",
                   lower_bound=0.0)
flags.DEFINE_integer("consistency_rampup_steps", 0, "Mean teacher: steps of the sigmoid ramp-up "
                     "weight * exp(-5 (1 - step/T)^2) of the consistency weight (0 = none).",
                     lower_bound=0)
flags.DEFINE_float("teacher_momentum", 0.99, "Mean teacher: EMA momentum of the teacher, in [0, 1).",
                   lower_bound=0.0)
flags.DEFINE_integer("unlabelled_batch_size", 0, "Mean teacher: unlabelled patches per batch "
                     "(0 = --batch_size).", lower_bound=0)
flags.DEFINE_float("consistency_noise", 0.1, "Mean teacher: std of the Gaussian noise (clipped at "
                   "2 std, network units) added independently to the student's and the teacher's "
                   "input.", lower_bound=0.0)
flags.mark_flags_as_required(["data_dir", "run_dir"])


def _flip_axes(text):
    text = text.strip()
    return () if text in ("none", "") else tuple(int(a) for a in text.split(","))


def _valid_flip_axes(text):
    try:
        axes = _flip_axes(text)
    except ValueError:
        return False
    return all(a in (0, 1, 2) for a in axes) and len(set(axes)) == len(axes)


def _valid_scale_range(values):
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        return False
    return 0 < lo <= hi <= 4


flags.register_validator("scale_range", _valid_scale_range, message="need LOW,HIGH with "
                         "0 < LOW <= HIGH <= 4")
flags.register_validator("flip_axes", _valid_flip_axes, message="need distinct axes among 0,1,2 "
                         "separated by commas, or 'none'")


def main(argv):
    if len(argv) > 1:
        flagutil.fail(__file__, f"unexpected arguments {argv[1:]}")
    from rr_tf.training.finetune_config import FinetuneConfig  # no TensorFlow yet

    def job():
        weights = None
        if FLAGS.class_weights:
            weights = tuple(float(w) for w in FLAGS.class_weights)
        args = {k: FLAGS[k].value for k in ("base_width", "levels", "norm", "decoder_width")
                if FLAGS[k].value is not None}
        if FLAGS.deep_supervision:
            args["deep_supervision"] = FLAGS.deep_supervision
        config = FinetuneConfig(
            data_dir=FLAGS.data_dir, run_dir=FLAGS.run_dir, pretrained=FLAGS.pretrained,
            parts=tuple(FLAGS.parts) if FLAGS.parts else None,
            allow_spec_mismatch=FLAGS.allow_spec_mismatch, load_weights=FLAGS.load_weights,
            segmenter=FLAGS.segmenter,
            segmenter_args=args, num_labeled=FLAGS.num_labeled, fg_fraction=FLAGS.fg_fraction,
            patch_sampling=FLAGS.patch_sampling, flip_axes=_flip_axes(FLAGS.flip_axes),
            intensity_augment=FLAGS.intensity_augment, tissue_shift_hu=FLAGS.tissue_shift_hu,
            scale_range=tuple(float(v) for v in FLAGS.scale_range),
            rotation_degrees=FLAGS.rotation_degrees, anisotropy=FLAGS.anisotropy,
            elastic_voxels=FLAGS.elastic_voxels, normalization=FLAGS.normalization,
            freeze_encoder_steps=FLAGS.freeze_encoder_steps, class_weights=weights,
            val_every=FLAGS.val_every, val_overlap=FLAGS.val_overlap,
            val_window_batch=FLAGS.val_window_batch, val_cases=FLAGS.val_cases,
            largest_component=FLAGS.largest_component,
            consistency_weight=FLAGS.consistency_weight,
            consistency_rampup_steps=FLAGS.consistency_rampup_steps,
            teacher_momentum=FLAGS.teacher_momentum,
            unlabelled_batch_size=FLAGS.unlabelled_batch_size,
            consistency_noise=FLAGS.consistency_noise, **flagutil.run_settings(__file__))
        config.validate()  # bad flag values are named before any data is generated
        flagutil.ensure_phantom_data(FLAGS.data_dir)
        from rr_tf.training.finetune import run_finetuning

        run_finetuning(config)

    flagutil.run_job(__file__, job)


if __name__ == "__main__":
    flagutil.main(__file__, main, flagutil.TRAIN_INTERRUPTED)
