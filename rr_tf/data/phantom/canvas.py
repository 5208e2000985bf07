"""The canvas the anatomy is painted on, with the shared fields and masks."""

import dataclasses

import numpy as np

from rr_tf.data.phantom.shapes import segment_sd, tube_pieces

# Organ labels (values of the label map), see LABEL_NAMES in __init__.py.
(LIVER, SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, STOMACH, PANCREAS, GALLBLADDER, AORTA, IVC,
 BONE) = range(1, 11)

# Extra bounding-box margin (mm) per mm of surface irregularity.
_ROUGH_MARGIN = 4.0


@dataclasses.dataclass
class Fields:
    """Random fields shared by the painters (full volume, float32, unit sd).

    ``surface``: smooth field roughening organ surfaces. ``bowel``: two
    band-pass fields whose joint zero set forms the small-bowel loops.
    ``contents``: smooth field choosing gas / fluid / collapsed bowel.
    ``medium``: three short-wavelength band-pass fields for vessel networks
    (liver, lung), pancreatic lobulation and clefts and stool mottling; the
    regions using one never overlap, so sharing them keeps them independent
    in effect.
    """

    surface: np.ndarray
    bowel: np.ndarray
    contents: np.ndarray
    medium: np.ndarray


def inside_superellipse(x, y, a, b_ant, b_post):
    """``|x/a|^p + |y/b|^p < 1`` (p = 2.5), with b = b_ant for y > 0 and b_post below."""
    u = np.abs(x) * np.float32(1.0 / a)
    v = np.maximum(y * np.float32(1.0 / b_ant), y * np.float32(-1.0 / b_post))
    return u * u * np.sqrt(u) + v * v * np.sqrt(v) < 1.0


class Canvas:
    """The tissue and label maps being painted, with coordinates, fields and masks.

    Masks set while painting (full-volume bool): ``body``, ``cavity`` (inside
    the muscle ring), ``blocked`` (vertebral column and back muscles),
    ``psoas`` and ``abdomen`` (cavity below the diaphragm, not blocked).
    """

    def __init__(self, grid, subject, q, fields):
        self.grid, self.subject, self.q, self.fields = grid, subject, q, fields
        self.tissue = np.zeros(grid.shape, np.uint8)
        self.labels = np.zeros(grid.shape, np.uint8)
        self.irregularity = fields.surface * np.float32(subject.irregularity_mm)
        self._spine = subject.spine_xy(q[2])  # spine centre line at every voxel's height

    def box(self, lo, hi):
        """Index box of the patient-frame box [lo, hi] (None if it misses the volume)."""
        return self.subject.frame.box(self.grid, lo, hi,
                                      margin_mm=4.0 + _ROUGH_MARGIN * self.subject.irregularity_mm)

    def coords(self, box):
        """Patient-frame coordinates (3 arrays) inside ``box``."""
        return [c[box] for c in self.q]

    def spine_relative(self, box):
        """Coordinates (xs, ys, z) relative to the spine's centre line, inside ``box``.

        ``box`` may be ``Ellipsis`` for the whole volume.
        """
        return (self.q[0][box] - self._spine[0][box], self.q[1][box] - self._spine[1][box],
                self.q[2][box])

    def paint(self, box, mask, tissue, label=0):
        """Set tissue (scalar, or array over the box) and label where ``mask``."""
        t = self.tissue[box]
        if np.ndim(tissue):
            t[mask] = tissue[mask]
        else:
            t[mask] = tissue
        self.labels[box][mask] = label

    def paint_tube(self, points, radii, layers, allowed, label=0, rough=0.0):
        """Paint a tube segment by segment, in passes from the outer layer inwards.

        ``layers``: list of ``(inset_mm, tissue)``; ``tissue`` is a class or a
        function ``fn(q, t, seg, box)`` returning a class array over the box,
        with ``t`` the position along the segment ``seg = (a, b, ra, rb)``.
        ``rough`` scales the shared surface irregularity.
        """
        evaluated = []
        for a, b, ra, rb, lo, hi in tube_pieces(points, radii):
            box = self.box(lo, hi)
            if box is None:
                continue
            q = self.coords(box)
            sd, t = segment_sd(q, a, b, ra, rb)
            if rough:
                sd += np.float32(rough) * self.irregularity[box]
            evaluated.append((box, q, sd, t, (a, b, ra, rb)))
        for inset, tissue in layers:
            for box, q, sd, t, seg in evaluated:
                mask = (sd < -inset) & allowed[box]
                value = tissue(q, t, seg, box) if callable(tissue) else tissue
                self.paint(box, mask, value, label)
