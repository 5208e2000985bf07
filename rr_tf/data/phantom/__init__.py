"""Synthetic abdominal CT phantoms with organ labels (docs/phantom.md).

``generate_phantom(seed)`` draws a subject (habitus, organ poses and sizes,
contrast phase), paints a tissue map and a label map on deformed
patient-frame coordinates, looks up Hounsfield units with texture, and runs
an acquisition model (slice-profile blur, filtered-back-projection noise,
int16 quantisation). Everything is deterministic per seed.

Array axes are RAS+: i towards the patient's Right, j Anterior, k Superior;
axial slices are ``image[:, :, k]``.

Random streams, one ``numpy.random.Generator`` each, so that changing one
part leaves the others untouched: ``[seed, 0]`` subject, ``[seed, 1]``
acquisition (hence ``phantom_spacing`` is exact and cheap), ``[seed, 2]``
shape fields, ``[seed, 3]`` intensities and texture, ``[seed, 4]`` noise.
"""

import dataclasses
import os

import numpy as np

from rr_tf.data.phantom import acquisition, anatomy, intensity
from rr_tf.data.phantom.canvas import Fields
from rr_tf.data.phantom.fields import Grid, bandpass_fields, smooth_fields, texture_field
from rr_tf.data.phantom.subject import DEFORMATION_CORR_MM, draw_subject
from rr_tf.data.phantom.tissues import PHASES
from rr_tf.data.volume import Volume
from rr_tf.errors import ConfigError, DataError

__all__ = ["LABEL_NAMES", "PHASES", "PhantomConfig", "Phantom", "generate_phantom",
           "phantom_spacing", "write_phantom_nifti"]

LABEL_NAMES = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "stomach",
               6: "pancreas", 7: "gallbladder", 8: "aorta", 9: "ivc", 10: "bone"}
GENERATOR_VERSION = 1

# Correlation lengths / wavelengths (mm) of the shape and texture fields.
SURFACE_CORR_MM = 20.0
CONTENTS_CORR_MM = 25.0
BOWEL_WAVELENGTH_MM = 55.0
MEDIUM_WAVELENGTH_MM = 16.0
LOW_TEXTURE_CORR_MM = 30.0
FINE_TEXTURE_CORR_MM = 1.5


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """Shape of the volumes and the difficulty knobs.

    Attributes:
      shape: array shape (i, j, k). Spacing ranges below are for 128 voxels
        and scale by 128 / shape, so the physical field of view is the same
        at every resolution.
      phase: force a contrast phase (one of PHASES); None draws it.
      phase_probabilities: probabilities of PHASES when drawn.
      noise_sigma_range: noise sd (HU) at the body centre.
      deformation_mm_range: sd of each component of the smooth displacement.
      position_jitter_mm: per-organ position jitter (each axis, uniform +-).
      bowel_density: width of the small-bowel loops (0 removes them, 1 normal).
      gallbladder_absent_probability: chance of a gallbladder-less subject.
      inplane_spacing_range_mm: pixel size for a 128-pixel matrix.
      slice_spacings_mm: slice spacing choices for 128 slices.
      thickness_factor_range: slice thickness / slice spacing.
    """

    shape: tuple = (128, 128, 128)
    phase: str | None = None
    phase_probabilities: tuple = (0.3, 0.2, 0.5)
    noise_sigma_range: tuple = (6.0, 30.0)
    deformation_mm_range: tuple = (3.0, 10.0)
    position_jitter_mm: float = 12.0
    bowel_density: float = 1.0
    gallbladder_absent_probability: float = 0.15
    inplane_spacing_range_mm: tuple = (2.6, 3.4)
    slice_spacings_mm: tuple = (2.0, 2.5, 3.0, 4.0)
    thickness_factor_range: tuple = (1.0, 1.6)

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(n) != n or n < 16 for n in self.shape):
            raise ConfigError("shape", f"need three integers >= 16, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if self.phase is not None and self.phase not in PHASES:
            raise ConfigError("phase", f"must be one of {PHASES} or None, got {self.phase!r}")
        if len(self.phase_probabilities) != 3 or min(self.phase_probabilities) < 0 \
                or sum(self.phase_probabilities) <= 0:
            raise ConfigError("phase_probabilities", "need 3 non-negative numbers, not all 0")
        for name in ("noise_sigma_range", "deformation_mm_range", "inplane_spacing_range_mm",
                     "thickness_factor_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ConfigError(name, f"need 0 <= low <= high, got {(lo, hi)!r}")
        if self.position_jitter_mm < 0 or self.bowel_density < 0:
            raise ConfigError("position_jitter_mm / bowel_density", "must be >= 0")
        if not 0 <= self.gallbladder_absent_probability <= 1:
            raise ConfigError("gallbladder_absent_probability", "must be in [0, 1]")
        if not self.slice_spacings_mm or min(self.slice_spacings_mm) <= 0:
            raise ConfigError("slice_spacings_mm", "need at least one positive spacing")


@dataclasses.dataclass
class Phantom:
    """One generated case.

    Attributes:
      image: int16 HU, shape == config.shape, clipped to [-1024, 3071].
      labels: uint8, 0 background, 1..10 as LABEL_NAMES.
      affine: 4x4 float64 voxel -> RAS+ mm (diagonal, volume centred at 0).
      meta: JSON-serialisable description (seed, phase, spacing, ...).
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    meta: dict

    @property
    def spacing(self):
        """Voxel size (mm) along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def to_volumes(self, case_id):
        """(image as float32 HU Volume, labels Volume), source ``phantom:<case_id>``."""
        meta = dict(self.meta, patient_id=case_id)
        source = f"phantom:{case_id}"
        return (Volume(self.image.astype(np.float32), self.affine.copy(), source,
                       dict(meta, original_dtype="int16")),
                Volume(self.labels.copy(), self.affine.copy(), source, dict(meta)))


def phantom_spacing(seed, config=None):
    """The voxel spacing ``generate_phantom(seed, config)`` uses, without building it."""
    return acquisition.draw_acquisition(seed, config or PhantomConfig()).spacing


def _patient_coords(grid, frame, disp):
    """Patient-frame coordinates ``R^T (p + d(p) - t) / g`` of every voxel (3 arrays).

    Consumes ``disp`` (its memory is reused).
    """
    for a in range(3):
        shape = [1, 1, 1]
        shape[a] = -1
        disp[a] += (grid.axis(a) - np.float32(frame.shift[a])).reshape(shape)
    r = (frame.rot / frame.scale).astype(np.float32)
    return [r[0, c] * disp[0] + r[1, c] * disp[1] + r[2, c] * disp[2] for c in range(3)]


def generate_phantom(seed, config=None):
    """Generate the phantom of ``seed`` (deterministic, bit-identical per seed)."""
    config = config or PhantomConfig()
    seed = int(seed)
    acq = acquisition.draw_acquisition(seed, config)
    grid = Grid(config.shape, acq.spacing)
    subject = draw_subject(np.random.default_rng([seed, 0]), config, grid.fov)

    rng = np.random.default_rng([seed, 2])
    disp = smooth_fields(rng, grid, 3, DEFORMATION_CORR_MM)
    disp *= np.float32(subject.deformation_mm)
    fields = Fields(surface=smooth_fields(rng, grid, 1, SURFACE_CORR_MM)[0],
                    contents=smooth_fields(rng, grid, 1, CONTENTS_CORR_MM)[0],
                    bowel=bandpass_fields(rng, grid, 2, BOWEL_WAVELENGTH_MM),
                    medium=bandpass_fields(rng, grid, 3, MEDIUM_WAVELENGTH_MM))
    frame = dataclasses.replace(subject.frame, max_disp=np.abs(disp).max(axis=(1, 2, 3)))
    subject = dataclasses.replace(subject, frame=frame)
    q = _patient_coords(grid, frame, disp)
    del disp
    tissue, labels = anatomy.build_anatomy(grid, subject, q, fields)
    del q

    rng = np.random.default_rng([seed, 3])
    luts = intensity.draw_tissue_hu(rng, subject.phase)
    low = smooth_fields(rng, grid, 1, LOW_TEXTURE_CORR_MM)[0]
    fine = texture_field(rng, grid, FINE_TEXTURE_CORR_MM)
    image = intensity.render_hu(tissue, subject.phase, luts, fine, low, fields.medium[2])
    del fine, low, fields, tissue

    a, b = subject.cavity
    half_axes = (frame.scale * (a + subject.muscle_mm + subject.fat[0]),
                 frame.scale * (b + subject.muscle_mm + 0.5 * (subject.fat[1] + subject.fat[2])))
    profile = acquisition.noise_profile(grid, frame.shift[:2], half_axes)
    noise = acquisition.ct_noise(np.random.default_rng([seed, 4]), grid.shape, acq)
    image = acquisition.acquire(image, acq, noise, profile)

    meta = {
        "generator": "rr_tf.phantom", "generator_version": GENERATOR_VERSION,
        "seed": seed, "shape": list(grid.shape), "phase": subject.phase,
        "spacing": list(acq.spacing), "slice_thickness_mm": acq.thickness_mm,
        "noise_sigma": acq.noise_sigma, "inplane_blur_voxels": acq.inplane_blur,
        "kernel_cutoff": acq.kernel_cutoff, "gallbladder_present": subject.gallbladder_present,
        "body_scale": float(frame.scale), "deformation_mm": float(subject.deformation_mm),
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
    }
    return Phantom(image=image, labels=labels, affine=grid.affine(), meta=meta)


def write_phantom_nifti(phantom, out_dir, case_id):
    """Write ``images/<case_id>.nii.gz`` (int16) and ``labels/<case_id>.nii.gz`` (uint8).

    Each file is written under a temporary name in its final folder, then
    renamed, so a reader never sees a partial file. Returns the two paths.
    """
    import nibabel as nib

    paths = []
    for sub, array in (("images", phantom.image.astype(np.int16)),
                       ("labels", phantom.labels.astype(np.uint8))):
        folder = os.path.join(os.fspath(out_dir), sub)
        path = os.path.join(folder, f"{case_id}.nii.gz")
        tmp = os.path.join(folder, f".{case_id}.{os.getpid()}.tmp.nii.gz")
        try:
            os.makedirs(folder, exist_ok=True)
            img = nib.Nifti1Image(array, phantom.affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(phantom.affine, code=1)
            img.set_sform(phantom.affine, code=1)
            nib.save(img, tmp)
            os.replace(tmp, path)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise DataError(path, f"cannot write phantom NIfTI: {err.strerror or err}") from err
        paths.append(path)
    return tuple(paths)
