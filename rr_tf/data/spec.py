"""The versioned preprocessing spec.

One spec describes how raw scans become stored voxels: orientation, target
spacing, interpolation, the Hounsfield window, the optional body crop and
the stored dtype. Its hash is written into every shard manifest (and later
every checkpoint and export) so that data made one way is never silently
mixed with data made another way.

Stored voxels are HU clipped to ``hu_window`` and rounded to int16; the
scaling to network input (``scaling``) is applied when the data is read,
so the shards keep the original HU inside the window, and one set of shards
serves several normalisations (:meth:`PreprocessSpec.with_normalization`
derives the spec of one: a window preset, or nnU-Net's CT scheme from the
data set's foreground intensity statistics).
"""

import dataclasses
import hashlib
import json

import numpy as np

from rr_tf.errors import ConfigError

SPEC_VERSION = 1
_INTERPOLATIONS = ("linear", "nearest")
_SCALINGS = ("unit", "none", "window", "ct")
# read-time normalisations of fine-tuning (``with_normalization``); each
# needs no new shards
NORMALIZATIONS = ("stored", "abdomen", "ct")
ABDOMEN_WINDOW = (-175.0, 250.0)  # soft-tissue window of the MONAI / Swin UNETR BTCV recipes
_DTYPES = {"int16": (-32768, 32767)}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How raw CT volumes are turned into stored training volumes.

    Attributes:
      spacing: target voxel size (mm) along the canonical axes (R, A, S), or
        None to keep each scan's own spacing.
      orientation: canonical axis codes; only "RAS" (nibabel's closest
        canonical) is supported.
      image_interpolation: "linear" or "nearest" for images.
      label_interpolation: "nearest" (the only sensible choice for labels).
      hu_window: (low, high) HU clip applied before storing.
      scaling: how stored HU become network input at read time: "unit" maps
        ``hu_window`` to [0, 1]; "window" clips to ``scaling_params`` (LOW,
        HIGH) and maps that to [0, 1]; "ct" is nnU-Net's CT scheme: clip to
        ``scaling_params[:2]`` (the 0.5 / 99.5 percentiles of the training
        set's foreground voxels), then subtract ``scaling_params[2]`` and
        divide by ``scaling_params[3]`` (their mean and std); "none" keeps HU.
      scaling_params: the numbers "window" and "ct" need (None otherwise; left
        out of the JSON and the hash when None, so older specs keep theirs).
      foreground_crop: crop each case to the body's bounding box (HU above
        ``foreground_threshold_hu``, largest connected component) plus a
        margin; labelled voxels are never cropped away.
      foreground_threshold_hu, foreground_margin_mm: body crop parameters.
      dtype: stored voxel dtype; "int16".
      version: format version of this spec; bumped when the meaning of a
        field changes.
    """

    spacing: tuple | None = (1.5, 1.5, 2.0)
    orientation: str = "RAS"
    image_interpolation: str = "linear"
    label_interpolation: str = "nearest"
    hu_window: tuple = (-1000.0, 1000.0)
    scaling: str = "unit"
    scaling_params: tuple | None = None
    foreground_crop: bool = False
    foreground_threshold_hu: float = -500.0
    foreground_margin_mm: float = 10.0
    dtype: str = "int16"
    version: int = SPEC_VERSION

    def __post_init__(self):
        # Normalise sequences to tuples of floats so equal specs hash equally.
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        if self.scaling_params is not None:
            object.__setattr__(self, "scaling_params",
                               tuple(float(v) for v in self.scaling_params))
        object.__setattr__(self, "foreground_threshold_hu", float(self.foreground_threshold_hu))
        object.__setattr__(self, "foreground_margin_mm", float(self.foreground_margin_mm))
        self.validate()

    def validate(self):
        if self.version != SPEC_VERSION:
            raise ConfigError("spec.version", f"unsupported spec version {self.version} "
                              f"(this rr_tf reads version {SPEC_VERSION})")
        if self.spacing is not None:
            if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
                raise ConfigError("spacing", f"need three positive numbers in mm, got {self.spacing}")
        if self.orientation != "RAS":
            raise ConfigError("orientation", f"only 'RAS' is supported, got {self.orientation!r}")
        for name in ("image_interpolation", "label_interpolation"):
            if getattr(self, name) not in _INTERPOLATIONS:
                raise ConfigError(name, f"must be one of {_INTERPOLATIONS}, got {getattr(self, name)!r}")
        if self.label_interpolation != "nearest":
            raise ConfigError("label_interpolation", "labels can only be resampled with 'nearest'")
        if self.dtype not in _DTYPES:
            raise ConfigError("dtype", f"must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        lo, hi = self.hu_window if len(self.hu_window) == 2 else (np.nan, np.nan)
        dmin, dmax = _DTYPES[self.dtype]
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ConfigError("hu_window", f"need LOW,HIGH with LOW < HIGH, got {self.hu_window}")
        if lo < dmin or hi > dmax:
            raise ConfigError("hu_window", f"{self.hu_window} does not fit the stored dtype {self.dtype}")
        if self.scaling not in _SCALINGS:
            raise ConfigError("scaling", f"must be one of {_SCALINGS}, got {self.scaling!r}")
        self._validate_scaling_params()
        if self.foreground_margin_mm < 0:
            raise ConfigError("foreground_margin_mm", "must be >= 0")

    def _validate_scaling_params(self):
        params = self.scaling_params
        want = {"window": 2, "ct": 4}.get(self.scaling, 0)
        if not want:
            if params is not None:
                raise ConfigError("scaling_params", f"scaling {self.scaling!r} takes no parameters, "
                                  f"got {params}")
            return
        if params is None or len(params) != want or not all(np.isfinite(params)):
            raise ConfigError("scaling_params", f"scaling {self.scaling!r} needs {want} finite "
                              f"numbers, got {params}")
        lo, hi = params[:2]
        if not lo < hi:
            raise ConfigError("scaling_params", f"need LOW < HIGH, got {params[:2]}")
        slo, shi = self.hu_window
        if lo < slo or hi > shi:
            raise ConfigError("scaling_params", f"the read-time clip {params[:2]} reaches beyond "
                              f"the stored window {self.hu_window}: those HU were not stored")
        if self.scaling == "ct" and not params[3] > 0:
            raise ConfigError("scaling_params", f"the CT scheme's std must be > 0, got {params[3]}")

    def with_normalization(self, name, intensity_properties=None):
        """The spec of reading these stored voxels with normalisation
        ``name``: "stored" (this spec), "abdomen" (clip to -175..250 HU, then
        [0, 1]) or "ct" (nnU-Net: ``intensity_properties`` of the training
        set's foreground, as :func:`rr_tf.data.prepare.intensity_properties`
        writes into the manifest). The result hashes differently, so weights
        trained under one are not loaded under another by mistake."""
        if name == "stored":
            return self
        if name == "abdomen":
            return dataclasses.replace(self, scaling="window", scaling_params=ABDOMEN_WINDOW)
        if name == "ct":
            props = intensity_properties or {}
            keys = ("percentile_00_5", "percentile_99_5", "mean", "std")
            if any(k not in props for k in keys):
                raise ConfigError("normalization", "'ct' needs the data set's foreground intensity "
                                  "statistics, which this manifest lacks (prepared before rr_tf "
                                  "computed them, or without labels); re-run "
                                  "launch/prepare_data.py with --overwrite")
            return dataclasses.replace(self, scaling="ct",
                                       scaling_params=tuple(props[k] for k in keys))
        raise ConfigError("normalization", f"must be one of {NORMALIZATIONS}, got {name!r}")

    # ----------------------------------------------------------------- JSON
    def to_dict(self):
        d = dataclasses.asdict(self)
        d["spacing"] = list(self.spacing) if self.spacing is not None else None
        d["hu_window"] = list(self.hu_window)
        if self.scaling_params is None:
            del d["scaling_params"]
        else:
            d["scaling_params"] = list(self.scaling_params)
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError("spec", f"unknown field(s) {unknown}; written by a newer rr_tf?")
        if "version" not in d:
            raise ConfigError("spec", "missing 'version'")
        return cls(**d)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    @property
    def hash(self):
        """Short content hash (16 hex digits) of the canonical JSON."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def describe(self):
        sp = "native" if self.spacing is None else "x".join(f"{s:g}" for s in self.spacing) + " mm"
        lo, hi = self.hu_window
        crop = ", body crop" if self.foreground_crop else ""
        read = ""
        if self.scaling == "window":
            read = ", read as window [{:g}, {:g}]".format(*self.scaling_params)
        elif self.scaling == "ct":
            read = ", read as CT z-score (clip [{:g}, {:g}], mean {:.1f}, std {:.1f})".format(
                *self.scaling_params)
        return (f"spacing {sp}, HU window [{lo:g}, {hi:g}], {self.dtype}{crop}{read} "
                f"(spec {self.hash})")

    # -------------------------------------------------------------- scaling
    def affine_scaling(self):
        """(clip_low, clip_high, offset, divisor): network input =
        (clip(HU, low, high) - offset) / divisor (None for "none")."""
        if self.scaling == "none":
            return None
        if self.scaling == "ct":
            return self.scaling_params
        lo, hi = self.hu_window if self.scaling == "unit" else self.scaling_params
        return lo, hi, lo, hi - lo

    def scale(self, hu):
        """Stored HU -> network input (numpy or anything with clip/arithmetics)."""
        if self.scaling == "none":
            return hu
        lo, hi, offset, divisor = self.affine_scaling()
        return (np.clip(hu, lo, hi) - offset) / divisor

    @property
    def hu_per_unit(self):
        """HU per unit of network input (1 when HU are fed as they are)."""
        if self.scaling == "none":
            return 1.0
        return float(self.affine_scaling()[3])

    def unscale(self, x):
        """Inverse of :meth:`scale` inside the window."""
        if self.scaling == "none":
            return x
        _, _, offset, divisor = self.affine_scaling()
        return x * divisor + offset
