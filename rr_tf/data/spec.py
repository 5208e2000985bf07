"""The versioned preprocessing spec.

One spec describes how raw scans become stored voxels: orientation, target
spacing, interpolation, the Hounsfield window, the optional body crop and
the stored dtype. Its hash is written into every shard manifest (and later
every checkpoint and export) so that data made one way is never silently
mixed with data made another way.

Stored voxels are HU clipped to ``hu_window`` and rounded to int16; the
scaling to network input (``scaling``) is applied when the data is read,
so the shards keep the original HU inside the window.
"""

import dataclasses
import hashlib
import json

import numpy as np

from rr_tf.errors import ConfigError

SPEC_VERSION = 1
_INTERPOLATIONS = ("linear", "nearest")
_SCALINGS = ("unit", "none")
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
      scaling: "unit" maps the window to [0, 1] at read time; "none" keeps HU.
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
        if self.foreground_margin_mm < 0:
            raise ConfigError("foreground_margin_mm", "must be >= 0")

    # ----------------------------------------------------------------- JSON
    def to_dict(self):
        d = dataclasses.asdict(self)
        d["spacing"] = list(self.spacing) if self.spacing is not None else None
        d["hu_window"] = list(self.hu_window)
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
        return f"spacing {sp}, HU window [{lo:g}, {hi:g}], {self.dtype}{crop} (spec {self.hash})"

    # -------------------------------------------------------------- scaling
    def scale(self, hu):
        """Stored HU -> network input (numpy or anything with clip/arithmetics)."""
        if self.scaling == "none":
            return hu
        lo, hi = self.hu_window
        return (np.clip(hu, lo, hi) - lo) / (hi - lo)

    def unscale(self, x):
        """Inverse of :meth:`scale` inside the window."""
        if self.scaling == "none":
            return x
        lo, hi = self.hu_window
        return x * (hi - lo) + lo
