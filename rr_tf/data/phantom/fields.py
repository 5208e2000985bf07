"""The voxel grid and the random fields drawn on it.

Every random field is built in the Fourier domain: complex Gaussian
coefficients shaped by an envelope, turned into a real field with one inverse
real FFT (``scipy.fft.irfftn``). This is far cheaper than zooming up coarse
noise and gives the exact spectrum asked for.

Fields whose spectrum is band-limited (the smooth and band-pass fields) draw
coefficients only for the physical frequencies ``m / fov`` they use. The field
of view is the same physical size whatever the array shape (spacing scales
with 128 / shape), so these fields, and the anatomy built from them, are the
same functions of world position at every resolution.
"""

import dataclasses

import numpy as np
import scipy.fft

# Threads for the FFTs (-1: every core).
FFT_WORKERS = -1
# Relative amplitude below which an envelope is treated as zero.
_ENVELOPE_CUTOFF = 1e-3


@dataclasses.dataclass(frozen=True)
class Grid:
    """A voxel grid of ``shape`` with ``spacing`` (mm), centred at the world origin.

    Voxel ``(i, j, k)`` has its centre at ``(index - (n - 1) / 2) * spacing``
    along each axis, in the RAS+ frame.
    """

    shape: tuple
    spacing: tuple

    @property
    def fov(self):
        """Physical extent (mm) along each axis."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing))

    @property
    def origin(self):
        """World position (mm) of voxel (0, 0, 0)."""
        return tuple(-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing))

    def axis(self, a):
        """World coordinates (mm, float32) of the voxel centres along axis ``a``."""
        n, s = self.shape[a], self.spacing[a]
        return ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).astype(np.float32)

    def affine(self):
        """4x4 float64 voxel -> RAS+ mm, diagonal spacing, volume centred at 0."""
        aff = np.diag([*map(float, self.spacing), 1.0])
        aff[:3, 3] = self.origin
        return aff

    def index_range(self, a, lo_mm, hi_mm):
        """Slice of voxel indices along axis ``a`` whose centres lie in [lo, hi] mm."""
        n, s = self.shape[a], self.spacing[a]
        o = self.origin[a]
        start = max(0, int(np.ceil((lo_mm - o) / s)))
        stop = min(n, int(np.floor((hi_mm - o) / s)) + 1)
        return slice(start, max(start, stop))


def _support(grid, k_max):
    """Per axis, the largest integer frequency index |m| with m / fov <= k_max."""
    return [
        int(min(np.floor(k_max * f), n // 2 - 1)) for n, f in zip(grid.shape, grid.fov)
    ]


def _spectral_fields(rng, grid, count, envelope, k_max):
    """``count`` zero-mean, unit-variance real fields with amplitude ``envelope(|k|)``.

    ``envelope`` maps spatial frequency magnitude (cycles/mm, float64 array) to
    the amplitude of the Fourier coefficients. Only coefficients with
    |m_a| <= M_a (the support of ``k_max``) are drawn, so the number of random
    draws, and the field itself, depend on the physical field of view only.
    """
    m0, m1, m2 = _support(grid, k_max)
    f0, f1, f2 = grid.fov
    i0 = np.r_[0 : m0 + 1, -m0:0]
    i1 = np.r_[0 : m1 + 1, -m1:0]
    i2 = np.arange(m2 + 1)
    k = np.sqrt(
        (i0[:, None, None] / f0) ** 2
        + (i1[None, :, None] / f1) ** 2
        + (i2[None, None, :] / f2) ** 2
    )
    amp = envelope(k).astype(np.float32)
    # Variance of the irfftn output (norm="forward"): a coefficient off the
    # k2 = 0 plane stands for itself and its conjugate twin (4 amp^2); on that
    # plane only its real part survives (amp^2).
    weight = np.full(amp.shape, 4.0)
    weight[:, :, 0] = 1.0
    scale = np.float32(1.0 / np.sqrt(np.sum(weight * amp.astype(np.float64) ** 2)))
    draws = rng.standard_normal((count, 2) + amp.shape, dtype=np.float32)
    coef = (draws[:, 0] + 1j * draws[:, 1]) * (amp * scale)
    spec = np.zeros((count, grid.shape[0], grid.shape[1], grid.shape[2] // 2 + 1),
                    np.complex64)
    idx0 = np.mod(i0, grid.shape[0])
    idx1 = np.mod(i1, grid.shape[1])
    spec[:, idx0[:, None], idx1[None, :], : m2 + 1] = coef
    spec[:, 0, 0, 0] = 0.0  # zero mean
    out = scipy.fft.irfftn(spec, s=grid.shape, axes=(1, 2, 3), norm="forward",
                           workers=FFT_WORKERS)
    return out.astype(np.float32, copy=False)


def smooth_fields(rng, grid, count, corr_mm):
    """``count`` smooth unit-variance fields with Gaussian correlation length ``corr_mm``.

    The covariance is ``exp(-r^2 / (2 corr^2))``; the coefficient amplitude is
    therefore ``exp(-pi^2 k^2 corr^2)``.
    """
    c = float(corr_mm)
    k_max = np.sqrt(-np.log(_ENVELOPE_CUTOFF)) / (np.pi * c)
    return _spectral_fields(rng, grid, count, lambda k: np.exp(-((np.pi * c * k) ** 2)),
                            k_max)


def bandpass_fields(rng, grid, count, wavelength_mm, rel_bandwidth=0.35):
    """``count`` unit-variance fields whose spectrum is a shell around 1 / wavelength.

    Level sets of such a field are sheets about half a wavelength apart; the
    set where two of them are both near zero is a network of tubes (bowel
    loops, vessels).
    """
    k0 = 1.0 / float(wavelength_mm)
    bw = rel_bandwidth * k0
    k_max = k0 + bw * np.sqrt(-2.0 * np.log(_ENVELOPE_CUTOFF))
    return _spectral_fields(rng, grid, count,
                            lambda k: np.exp(-0.5 * ((k - k0) / bw) ** 2), k_max)


def texture_field(rng, grid, corr_mm):
    """One unit-variance fine texture field (correlation ``corr_mm``), every frequency."""
    c = float(corr_mm)
    return _spectral_fields(rng, grid, 1, lambda k: np.exp(-((np.pi * c * k) ** 2)),
                            np.inf)[0]
