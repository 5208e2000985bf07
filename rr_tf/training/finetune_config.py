"""The fine-tuning run's configuration (:class:`FinetuneConfig`), without
TensorFlow: ``launch/finetune.py`` validates its flags with it before any
heavy import or data generation. The engine is :mod:`rr_tf.training.finetune`."""

import dataclasses
import math
import os

from rr_tf.data.options import PATCH_SAMPLING
from rr_tf.data.spec import NORMALIZATIONS
from rr_tf.errors import ConfigError
from rr_tf.training.settings import FINETUNE_DEFAULTS, RunSettings

SEGMENTER_CHOICES = ("auto", "unet", "hybrid", "unetr", "slice2d")
LARGEST_COMPONENT = ("auto", "none", "all")


def _default(value):
    """A RunSettings default changed for fine-tuning (keyword-only, as there)."""
    return dataclasses.field(default=value, kw_only=True)


@dataclasses.dataclass
class FinetuneConfig(RunSettings):
    """A fine-tuning run: data, starting point, segmenter, labelled budget,
    validation, the optional mean teacher, and the shared
    :class:`~rr_tf.training.settings.RunSettings` (with fine-tuning's defaults)."""
    data_dir: str
    run_dir: str
    pretrained: str | None = None        # run dir, export dir or .keras file; None = from scratch
    parts: tuple | None = None           # restrict the parts loaded (default: all that match)
    allow_spec_mismatch: bool = False
    load_weights: bool = True            # False: --pretrained's architecture, random weights (control)
    segmenter: str = "auto"              # auto = what the pre-training transfers into (else unet)
    segmenter_args: dict = dataclasses.field(default_factory=dict)  # from scratch / overrides
    num_labeled: str = "all"             # N cases, a fraction in (0, 1), or "all"
    batch_size: int = _default(FINETUNE_DEFAULTS["batch_size"])
    crops_per_volume: int = _default(FINETUNE_DEFAULTS["crops_per_volume"])
    weight_decay: float = _default(FINETUNE_DEFAULTS["weight_decay"])
    keep_checkpoints: int = _default(FINETUNE_DEFAULTS["keep_checkpoints"])
    fg_fraction: float = 1.0 / 3.0
    patch_sampling: str = "class_balanced"   # class_balanced | foreground (PATCH_SAMPLING)
    # augmentation (docs/results.md, "Fine-tuning recipe": flips cost 0.20 held-out Dice at 1000
    # steps on canonically oriented CT; the per-organ offsets carry labels across contrast phases)
    flip_axes: tuple = ()                # patch flips (axis 0 = left-right on RAS+ volumes)
    intensity_augment: bool = True       # nnU-Net's noise / blur / contrast / gamma
    tissue_shift_hu: float = 100.0       # per-organ HU offsets U(-x, x) (contrast phases); 0 = off
    # shape augmentation (docs/results.md: held-out 0.721 -> 0.769 at 3000 steps, 4 labelled)
    scale_range: tuple = (0.85, 1.2)     # zoom of the patch content (random_deform)
    rotation_degrees: float = 10.0       # rotations up to +-x degrees about each axis
    anisotropy: float = 0.15             # per-axis zoom factors 1 +- x
    elastic_voxels: float = 3.0          # smooth elastic displacement up to x voxels; 0 = off
    normalization: str = "stored"        # read-time intensity normalisation (spec.NORMALIZATIONS)
    freeze_encoder_steps: int = 0
    class_weights: tuple | None = None
    val_every: int = 100
    val_overlap: float = 0.5
    val_window_batch: int = 2
    val_cases: int = 0               # validation volumes used (0 = every labelled val case)
    largest_component: str = "auto"  # auto (chosen per class on validation) | none | all
    # semi-supervised mean teacher (rr_tf.training.mean_teacher); 0 = off
    consistency_weight: float = 0.0
    consistency_rampup_steps: int = 0    # sigmoid ramp-up of the weight (0 = none)
    teacher_momentum: float = 0.99       # EMA momentum of the teacher
    unlabelled_batch_size: int = 0       # unlabelled patches per batch (0 = batch_size)
    consistency_noise: float = 0.1       # std of the Gaussian input noise (network units)

    @property
    def mean_teacher(self):
        return self.consistency_weight > 0

    def validate(self):
        if self.val_cases < 0:
            raise ConfigError("val_cases", f"must be >= 0, got {self.val_cases}")
        if self.segmenter not in SEGMENTER_CHOICES:
            raise ConfigError("segmenter", f"must be one of {SEGMENTER_CHOICES}, got {self.segmenter!r}")
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ConfigError("pretrained", f"{self.pretrained} does not exist")
        if not self.load_weights and not self.pretrained:
            raise ConfigError("load_weights", "false needs --pretrained (whose architecture is "
                              "built with random weights)")
        self.validate_run()
        if self.freeze_encoder_steps >= self.train_steps and self.freeze_encoder_steps:
            raise ConfigError("freeze_encoder_steps", "must be smaller than train_steps")
        if self.patch_sampling not in PATCH_SAMPLING:
            raise ConfigError("patch_sampling", f"must be one of {PATCH_SAMPLING}, got "
                              f"{self.patch_sampling!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError("normalization", f"must be one of {NORMALIZATIONS}, got "
                              f"{self.normalization!r}")
        if any(a not in (0, 1, 2) for a in self.flip_axes) or \
                len(set(self.flip_axes)) != len(self.flip_axes):
            raise ConfigError("flip_axes", f"must be distinct axes among 0, 1, 2, got "
                              f"{self.flip_axes}")
        if not (math.isfinite(self.tissue_shift_hu) and self.tissue_shift_hu >= 0):
            raise ConfigError("tissue_shift_hu", f"must be a finite number >= 0 (0 = off), got "
                              f"{self.tissue_shift_hu}")
        lo_hi = tuple(self.scale_range)
        if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or \
                not 0 < lo_hi[0] <= lo_hi[1] <= 4:
            raise ConfigError("scale_range", f"must be LOW,HIGH with 0 < LOW <= HIGH <= 4, got "
                              f"{self.scale_range}")
        if not 0.0 <= self.rotation_degrees <= 180.0:
            raise ConfigError("rotation_degrees", f"must be in [0, 180], got "
                              f"{self.rotation_degrees}")
        if not 0.0 <= self.anisotropy < 0.5:
            raise ConfigError("anisotropy", f"must be in [0, 0.5), got {self.anisotropy}")
        if not (math.isfinite(self.elastic_voxels) and 0.0 <= self.elastic_voxels <= 16.0):
            raise ConfigError("elastic_voxels", f"must be in [0, 16] (0 = off), got "
                              f"{self.elastic_voxels}")
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise ConfigError("fg_fraction", "must be in [0, 1]")
        if self.largest_component not in LARGEST_COMPONENT:
            raise ConfigError("largest_component", f"must be one of {LARGEST_COMPONENT}, got "
                              f"{self.largest_component!r}")
        if not 0.0 <= self.val_overlap < 1.0:
            raise ConfigError("val_overlap", "must be in [0, 1)")
        parse_budget(self.num_labeled)
        if not (math.isfinite(self.consistency_weight) and self.consistency_weight >= 0):
            raise ConfigError("consistency_weight", f"must be a finite number >= 0 (0 = off), "
                              f"got {self.consistency_weight}")
        if self.consistency_rampup_steps < 0:
            raise ConfigError("consistency_rampup_steps", f"must be >= 0 (0 = no ramp-up), got "
                              f"{self.consistency_rampup_steps}")
        if not 0.0 <= self.teacher_momentum < 1.0:
            raise ConfigError("teacher_momentum", f"must be in [0, 1), got {self.teacher_momentum}")
        if self.unlabelled_batch_size < 0:
            raise ConfigError("unlabelled_batch_size", f"must be >= 0 (0 = batch_size), got "
                              f"{self.unlabelled_batch_size}")
        if not (math.isfinite(self.consistency_noise) and self.consistency_noise >= 0):
            raise ConfigError("consistency_noise", f"must be a finite number >= 0, got "
                              f"{self.consistency_noise}")


def parse_budget(text):
    """'all' -> None, '3' -> 3, '0.25' -> 0.25 (ConfigError otherwise)."""
    text = str(text).strip()
    if text == "all":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("num_labeled", f"must be 'all', a count or a fraction, got {text!r}") from None
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise ConfigError("num_labeled", f"must be 'all', a count >= 1 or a fraction in (0, 1), got {text!r}")
