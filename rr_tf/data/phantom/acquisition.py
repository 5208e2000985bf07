"""The acquisition model: voxel grid, slice-profile blur, CT noise, quantisation.

Acquisition parameters come from their own generator
(``default_rng([seed, 1])``) and are drawn before anything else, so
``phantom_spacing`` can report the spacing without building a volume.
"""

import dataclasses

import numpy as np
import scipy.fft
import scipy.ndimage

from rr_tf.data.phantom.fields import FFT_WORKERS

REFERENCE_MATRIX = 128  # spacing ranges are stated for 128 voxels per axis
HU_MIN, HU_MAX = -1024, 3071
FWHM_PER_SIGMA = 2.355
# Noise is strongest at the body centre and falls to this fraction at the skin.
NOISE_EDGE_FRACTION = 0.7


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """Scanner and reconstruction parameters of one phantom.

    Attributes:
      spacing: voxel size (mm) along i, j, k.
      thickness_mm: reconstructed slice thickness (FWHM of the slice profile).
      inplane_blur: in-plane Gaussian sigma of the system blur (voxels).
      noise_sigma: noise sd (HU) at the body centre.
      kernel_cutoff: where the reconstruction window reaches zero (cycles /
        voxel; above the 0.5 Nyquist limit only part of the roll-off is seen,
        i.e. a sharper kernel).
      noise_z_sigma: Gaussian correlation of the noise across slices (voxels).
    """

    spacing: tuple
    thickness_mm: float
    inplane_blur: float
    noise_sigma: float
    kernel_cutoff: float
    noise_z_sigma: float

    @property
    def slice_sigma(self):
        """Slice-profile sigma in voxels: thickness / (2.355 x slice spacing)."""
        return self.thickness_mm / (FWHM_PER_SIGMA * self.spacing[2])


def draw_acquisition(seed, config):
    """The acquisition parameters of phantom ``seed`` (cheap, exact)."""
    rng = np.random.default_rng([seed, 1])
    ni, nj, nk = config.shape
    pixel = rng.uniform(*config.inplane_spacing_range_mm)
    slice_mm = float(config.slice_spacings_mm[rng.integers(len(config.slice_spacings_mm))])
    thickness = slice_mm * rng.uniform(*config.thickness_factor_range)
    spacing = (pixel * REFERENCE_MATRIX / ni, pixel * REFERENCE_MATRIX / nj,
               slice_mm * REFERENCE_MATRIX / nk)
    return Acquisition(
        spacing=tuple(float(s) for s in spacing),
        thickness_mm=float(thickness * REFERENCE_MATRIX / nk),
        inplane_blur=float(rng.uniform(0.45, 0.8)),
        noise_sigma=float(rng.uniform(*config.noise_sigma_range)),
        kernel_cutoff=float(rng.uniform(0.55, 0.8)),
        noise_z_sigma=float(rng.uniform(0.25, 0.45)),
    )


def blur(image, acq):
    """System blur: Gaussian in-plane, Gaussian slice profile along k."""
    sigma = (acq.inplane_blur, acq.inplane_blur, acq.slice_sigma)
    return scipy.ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0)


def ct_noise(rng, shape, acq):
    """Unit-sd noise with a filtered-back-projection texture.

    White noise filtered per slice with a ramp-times-window spectrum (noise
    power ~ |f| W(f)^2, no low frequencies, grainy) and slightly correlated
    across slices.
    """
    n0, n1, n2 = shape
    f0 = np.fft.fftfreq(n0).astype(np.float32)[:, None, None]
    f1 = np.fft.fftfreq(n1).astype(np.float32)[None, :, None]
    f2 = np.fft.rfftfreq(n2).astype(np.float32)[None, None, :]
    fr = np.sqrt(f0**2 + f1**2)
    hann = 0.5 + 0.5 * np.cos(np.pi * fr / acq.kernel_cutoff)
    window = np.where(fr < acq.kernel_cutoff, hann, 0.0)
    across = np.exp(-2.0 * np.pi**2 * acq.noise_z_sigma**2 * f2**2)
    gain = (np.sqrt(fr) * window * across).astype(np.float32)
    draws = rng.standard_normal((2,) + gain.shape, dtype=np.float32)
    spec = (draws[0] + 1j * draws[1]) * gain
    noise = scipy.fft.irfftn(spec, s=shape, norm="forward", workers=FFT_WORKERS)
    noise = noise.astype(np.float32, copy=False)
    noise *= np.float32(1.0 / noise.std())
    return noise


def noise_profile(grid, centre, half_axes):
    """In-plane noise amplitude (2D, float32): 1 at the body centre, lower outwards.

    ``centre`` (x, y) and ``half_axes`` (a, b) of the body outline in world mm.
    """
    x = (grid.axis(0) - np.float32(centre[0])) / np.float32(half_axes[0])
    y = (grid.axis(1) - np.float32(centre[1])) / np.float32(half_axes[1])
    rho2 = np.minimum(x[:, None] ** 2 + y[None, :] ** 2, 1.0)
    return (1.0 - (1.0 - NOISE_EDGE_FRACTION) * rho2).astype(np.float32)


def acquire(image, acq, noise, profile):
    """Blur, add noise (``noise`` unit sd x sigma x ``profile``), round, clip -> int16."""
    out = blur(image, acq)
    out += noise * (np.float32(acq.noise_sigma) * profile[:, :, None])
    np.rint(out, out=out)
    np.clip(out, HU_MIN, HU_MAX, out=out)
    return out.astype(np.int16)
