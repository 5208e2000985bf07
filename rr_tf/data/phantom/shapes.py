"""Implicit shape primitives and the patient frame.

Every organ is an approximate signed distance function (mm, negative inside)
evaluated on patient-frame coordinates. Patient-frame coordinates ``q`` of a
voxel at world position ``p`` are ``q = R^T (p + d(p) - t) / g``: the smooth
random displacement ``d`` warps all organs together, then the subject's
global position ``t``, small rotation ``R`` and global scale ``g`` are
undone. In the patient frame x points to the patient's right, y anterior and
z superior; (0, 0) is the centre of the abdominal cavity and z = 0 the level
of the first lumbar vertebra.
"""

import dataclasses

import numpy as np

_EPS = np.float32(1e-6)


def rotation(rx_deg, ry_deg, rz_deg):
    """3x3 rotation (float64): about x, then y, then z, angles in degrees."""
    ax, ay, az = np.radians([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


@dataclasses.dataclass(frozen=True)
class PatientFrame:
    """Patient <-> world mapping: ``p = g R q + t - d(p)``.

    Attributes:
      scale: global scale ``g``.
      rot: 3x3 rotation ``R``.
      shift: world position ``t`` (mm) of the patient-frame origin.
      max_disp: per-axis bound on ``|d|`` (mm), to grow bounding boxes.
    """

    scale: float
    rot: np.ndarray
    shift: np.ndarray
    max_disp: np.ndarray

    def to_world(self, q):
        """World positions (N, 3) of patient-frame points ``q`` (N, 3), ignoring d."""
        return self.scale * np.asarray(q, np.float64) @ self.rot.T + self.shift

    def box(self, grid, lo, hi, margin_mm=4.0):
        """Index slices of the world box holding the patient-frame box [lo, hi].

        Returns None when the box misses the grid.
        """
        lo = np.asarray(lo, np.float64)
        hi = np.asarray(hi, np.float64)
        corners = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)]
                            for bits in np.ndindex(2, 2, 2)])
        world = self.to_world(corners)
        grow = self.max_disp + margin_mm
        box = tuple(grid.index_range(a, world[:, a].min() - grow[a], world[:, a].max() + grow[a])
                    for a in range(3))
        if any(s.stop <= s.start for s in box):
            return None
        return box


def local_coords(q, centre, rot=None, scale=1.0):
    """Coordinates of points ``q`` (3 arrays) in a local frame: ``R^T (q - c) / s``."""
    d = [q[a] - np.float32(centre[a]) for a in range(3)]
    if rot is None:
        out = d
    else:
        r = np.asarray(rot, np.float32)
        out = [r[0, a] * d[0] + r[1, a] * d[1] + r[2, a] * d[2] for a in range(3)]
    if scale != 1.0:
        inv = np.float32(1.0 / scale)
        out = [u * inv for u in out]
    return out


def ellipsoid_sd(u, half_axes):
    """Approximate signed distance (mm) to an axis-aligned ellipsoid at the origin.

    First-order estimate ``(r - 1) / |grad r|`` with ``r`` the normalised radius;
    exact on the surface and on the axes.
    """
    a, b, c = (np.float32(h) for h in half_axes)
    x, y, z = u[0] / a, u[1] / b, u[2] / c
    r = np.sqrt(x * x + y * y + z * z) + _EPS
    grad = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2) / r + _EPS
    return (r - 1.0) / grad


def superellipsoid_sd(u, half_axes, power):
    """Approximate signed distance (mm) to ``sum |u_i / a_i|^p <= 1``."""
    p = np.float32(power)
    terms = [np.abs(u[i] / np.float32(half_axes[i])) + _EPS for i in range(3)]
    powered = [t ** p for t in terms]
    s = powered[0] + powered[1] + powered[2]
    r = s ** (1.0 / p)
    # |grad r| = r^(1-p) * sqrt(sum (t_i^(p-1) / a_i)^2)
    g = np.sqrt(sum((pw / t / np.float32(a)) ** 2
                    for pw, t, a in zip(powered, terms, half_axes)))
    return (r - 1.0) / (g * r ** (1.0 - p) + _EPS)


def segment_sd(q, a, b, ra, rb):
    """Signed distance (mm) to a cone-capped segment from ``a`` (radius ``ra``) to ``b`` (``rb``).

    Returns ``(sd, t)`` with ``t`` in [0, 1] the position of the nearest
    centre-line point along the segment; the radius varies linearly with it.
    """
    a = np.asarray(a, np.float64)
    d = np.asarray(b, np.float64) - a
    dd = float(d @ d) + 1e-9
    rel = [q[i] - np.float32(a[i]) for i in range(3)]
    t = sum(rel[i] * np.float32(d[i] / dd) for i in range(3))
    np.clip(t, 0.0, 1.0, out=t)
    dist2 = sum((rel[i] - t * np.float32(d[i])) ** 2 for i in range(3))
    return np.sqrt(dist2) - (np.float32(ra) + t * np.float32(rb - ra)), t


def tube_pieces(points, radii):
    """The segments of a tube through ``points`` (K, 3) with ``radii`` (K,).

    Yields ``(a, b, ra, rb, lo, hi)``: end points, end radii and the
    patient-frame bounding box of the segment.
    """
    points = np.asarray(points, np.float64)
    for s in range(len(points) - 1):
        a, b = points[s], points[s + 1]
        r = max(radii[s], radii[s + 1])
        yield a, b, radii[s], radii[s + 1], np.minimum(a, b) - r, np.maximum(a, b) + r


def smooth_curve(control, samples_per_segment=4):
    """Catmull-Rom spline through ``control`` points (K, 3) -> denser points."""
    c = np.asarray(control, np.float64)
    padded = np.vstack([2 * c[0] - c[1], c, 2 * c[-1] - c[-2]])
    out = []
    for s in range(len(c) - 1):
        p0, p1, p2, p3 = padded[s : s + 4]
        for t in np.linspace(0.0, 1.0, samples_per_segment, endpoint=False):
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    out.append(c[-1])
    return np.array(out)


def smooth_tube(points, radii, samples_per_segment=3):
    """A smooth centre line through control ``points`` with radii interpolated along it."""
    dense = smooth_curve(points, samples_per_segment)
    r = np.interp(np.linspace(0.0, 1.0, len(dense)), np.linspace(0.0, 1.0, len(radii)), radii)
    return dense, r


def smooth_union(a, b, k_mm):
    """Polynomial smooth minimum of two signed distances (blend width ``k_mm``)."""
    k = np.float32(k_mm)
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25
