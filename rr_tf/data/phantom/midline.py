"""Structures placed along the spine: back muscles, great vessels, vertebrae and ribs.

All of them follow the spine's centre line ``subject.spine_xy(z)`` (lumbar
lordosis, slight scoliosis) and are evaluated in spine-relative coordinates
``(xs, ys)`` inside a box around the column.
"""

import numpy as np

from rr_tf.data.phantom.canvas import AORTA, BONE, IVC, inside_superellipse
from rr_tf.data.phantom.shapes import smooth_tube
from rr_tf.data.phantom.tissues import Tissue as T

_FAR = 1e4  # "unbounded" extent (mm) for boxes along z
# Vertebra (lumbar) geometry relative to the centre of the vertebral body (mm).
BODY_HALF = (22.0, 16.0)  # left-right, antero-posterior half-axes
CORTEX_MM = 2.5
CANAL_Y, CANAL_R = -27.0, 9.0
ARCH_R = 16.0
SPINOUS_HALF_WIDTH, SPINOUS_END = 4.0, -70.0
TRANSVERSE_LEN, TRANSVERSE_HALF = 36.0, 4.5
DISC_MM = 8.0
# Ribs: depth band around the inner muscle boundary and height (mm), fall
# (mm) from the rib head to the anterior end, extent (radians from the back).
RIB_BAND_MM, RIB_HALF_HEIGHT, RIB_FALL = 4.0, 5.0, 80.0
RIB_START = 0.5
RIB_END = {0: 1.3, 1: 1.8}  # T12 and T11 float; higher ribs reach 2.5
RIB_END_DEFAULT, CARTILAGE_LEN = 2.5, 0.45


def _spine_box(cv, half_x, y_lo, y_hi, z_lo=-_FAR, z_hi=_FAR):
    y0 = cv.subject.spine["y0"]
    box = cv.box((-half_x, y0 + y_lo, z_lo), (half_x, y0 + y_hi, z_hi))
    if box is None:
        return None, None
    return box, cv.spine_relative(box)


def paint_back_muscles(cv):
    """Erector spinae either side of the spinous processes; psoas from L1 down."""
    s = cv.subject
    box, (xs, ys, z) = _spine_box(cv, 100.0, -100.0, 60.0)
    if box is None:
        return
    para = (((np.abs(xs) - 33.0) / 26.0) ** 2 + ((ys + 46.0) / 24.0) ** 2 < 1.0) & cv.body[box]
    cv.paint(box, para, T.MUSCLE)
    column = (xs / 26.0) ** 2 + ((ys + 18.0) / 36.0) ** 2 < 1.0
    cv.blocked[box] |= para | column
    z_top = s.spine["z_l1"] + 0.5 * s.spine["level_mm"]
    depth = np.maximum(z_top - z, 0.0)
    radius = np.minimum(0.2 * depth, 24.0)
    centre_x = 20.0 + 0.12 * depth + 0.6 * radius
    psoas = ((np.abs(xs) - centre_x) ** 2 + (ys - 2.0) ** 2 < radius**2) & cv.cavity[box]
    cv.paint(box, psoas, T.MUSCLE)
    cv.psoas[box] = psoas


def _vertical_vessel(cv, dx, dy, rx, ry, z_lo, z_hi, tissue, label, forward=None):
    """A tube following the spine at offset (dx, dy), elliptic section (rx, ry).

    ``forward(z)``, if given, adds a z-dependent anterior offset in [0, 25] mm.
    """
    y0 = cv.subject.spine["y0"]
    r = max(rx, ry)
    box = cv.box((dx - r - 20.0, y0 + dy - r - 30.0, z_lo),
                 (dx + r + 20.0, y0 + dy + r + 55.0, z_hi))
    if box is None:
        return
    xs, ys, z = cv.spine_relative(box)
    if forward is not None:
        dy = dy + forward(z)
    inside = ((xs - dx) / rx) ** 2 + ((ys - dy) / ry) ** 2 < 1.0
    inside &= (z > z_lo) & (z < z_hi) & cv.cavity[box]
    cv.paint(box, inside, tissue, label)


def paint_vessels(cv):
    """Aorta and IVC (labelled); iliac, renal, mesenteric, splenic and portal veins (context)."""
    s = cv.subject
    v = s.vessels
    r_ao = v["aorta_r"]
    rx_ivc, ry_ivc = v["ivc"]
    z_bif = v["z_bif"]
    ao = (-15.0, BODY_HALF[1] + 3.0 + r_ao)
    ivc = (24.0, BODY_HALF[1] + 2.0 + ry_ivc)
    y0 = s.spine["y0"]
    liver_z = s.poses["liver"].centre[2]
    heart_z = s.poses["heart"].centre[2]

    def x_at(z):
        return float(s.spine_xy(z)[0])

    def y_at(z):
        return float(s.spine_xy(z)[1])

    def ivc_forward(z):  # the IVC runs forward into the liver's bare area
        return np.clip(0.35 * (z - liver_z + 20.0), 0.0, 22.0)

    _vertical_vessel(cv, ao[0], ao[1], r_ao, r_ao, z_bif, heart_z + 60.0, T.ARTERIAL_BLOOD, AORTA)
    _vertical_vessel(cv, ivc[0], ivc[1], rx_ivc, ry_ivc, z_bif - 12.0, heart_z, T.CAVAL_BLOOD, IVC,
                     forward=ivc_forward)
    # Common iliac arteries and veins.
    for side in (-1.0, 1.0):
        start = np.array([x_at(z_bif) + ao[0], y_at(z_bif) + ao[1], z_bif + 2.0])
        end = start + (side * 55.0 - ao[0], 5.0, -110.0)
        cv.paint_tube(np.array([start, end]), [0.7 * r_ao, 0.6 * r_ao], [(0.0, T.ARTERIAL_BLOOD)],
                      cv.cavity)
        z_c = z_bif - 10.0
        start = np.array([x_at(z_c) + ivc[0], y_at(z_c) + ivc[1], z_c + 2.0])
        end = np.array([x_at(z_c) + side * 48.0, y_at(z_c) + ivc[1] - 6.0, z_c - 110.0])
        cv.paint_tube(np.array([start, end]), [0.7 * rx_ivc, 0.65 * rx_ivc], [(0.0, T.CAVAL_BLOOD)],
                      cv.cavity)
    # Renal veins: hilum -> IVC; the left one passes in front of the aorta.
    for name in ("kidney_right", "kidney_left"):
        pose = s.poses[name]
        hilum = pose.centre + pose.rot @ np.array([-24.0 * pose.scale, 0.0, 0.0])
        z = hilum[2]
        target = np.array([x_at(z) + ivc[0], y_at(z) + ivc[1], z + 4.0])
        path = [hilum, target]
        if name == "kidney_left":
            in_front_of_aorta = np.array([x_at(z) + ao[0], y_at(z) + ao[1] + r_ao + 5.0, z + 2.0])
            path = [hilum, in_front_of_aorta, target]
        cv.paint_tube(np.array(path), [5.0] * len(path), [(0.0, T.CAVAL_BLOOD)], cv.abdomen)
    # Portal system behind the pancreatic neck; superior mesenteric artery.
    pancreas, p_radii = s.tubes["pancreas"]
    confluence = pancreas[1] - (0.0, p_radii[1] + 5.0, 0.0)
    porta = s.tubes["gallbladder"][0][0] + (-8.0, -14.0, 14.0)
    smv_end = confluence + (6.0, -6.0, -110.0)
    cv.paint_tube(np.array([smv_end, confluence, porta]), [5.0, 6.5, 7.0],
                  [(0.0, T.PORTAL_BLOOD)], cv.cavity)
    splenic = pancreas[1:] - np.stack([np.zeros(4), p_radii[1:] + 4.0, np.zeros(4)], 1)
    cv.paint_tube(*smooth_tube(np.vstack([confluence, splenic]), [5.0] * 5),
                  [(0.0, T.PORTAL_BLOOD)], cv.cavity)
    z_sma = s.spine["z_l1"] + 5.0
    sma0 = np.array([x_at(z_sma) + ao[0], y0 + ao[1] + r_ao, z_sma])
    cv.paint_tube(np.array([sma0, sma0 + (4.0, 14.0, -20.0), sma0 + (10.0, 18.0, -120.0)]),
                  [4.0, 3.5, 3.0], [(0.0, T.ARTERIAL_BLOOD)], cv.cavity)


def paint_bones(cv):
    """Vertebrae (body, disc, arch, processes, spinal canal) and ribs with costal cartilage."""
    _paint_vertebrae(cv)
    _paint_ribs(cv)


def _paint_vertebrae(cv):
    s = cv.subject
    box, (xs, ys, z) = _spine_box(cv, 80.0, -80.0, 30.0)
    if box is None:
        return
    level = s.spine["level_mm"]
    phase = (z - s.spine["z_l1"]) / level
    zl = (phase - np.round(phase)) * level  # height within the level, 0 at the body centre
    # Thoracic vertebrae are smaller.
    size = np.clip(1.0 - 0.003 * (z - s.spine["z_l1"]), 0.75, 1.05).astype(np.float32)
    ex, ey = BODY_HALF[0] * size, BODY_HALF[1] * size
    rho = np.sqrt((xs / ex) ** 2 + (ys / ey) ** 2)
    half_height = 0.5 * (level - DISC_MM)
    body = (rho < 1.0) & (np.abs(zl) < half_height)
    disc = (rho < 0.95) & ~body
    shell = body & ((rho > 1.0 - CORTEX_MM / ey) | (np.abs(zl) > half_height - CORTEX_MM))
    ring = np.hypot(xs, ys - CANAL_Y * size)
    canal = ring < CANAL_R * size
    in_arch = (zl > -0.38 * level) & (zl < 0.2 * level)
    arch = in_arch & (ring < ARCH_R * size) & ~canal
    spinous = (in_arch & (np.abs(xs) < SPINOUS_HALF_WIDTH) & (ys < CANAL_Y * size)
               & (ys > SPINOUS_END * size))
    lumbar = z < s.spine["z_l1"] + 0.5 * level
    transverse = (lumbar & (np.abs(zl + 3.0) < TRANSVERSE_HALF)
                  & (np.abs(xs) < 14.0 + TRANSVERSE_LEN)
                  & (np.abs(ys - (CANAL_Y + 3.0) * size) < 5.0))
    inside = cv.body[box]
    bone = (body | disc | arch | spinous | transverse) & inside
    tissue = np.full(bone.shape, T.CORTICAL_BONE, np.uint8)
    tissue[body & ~shell] = T.CANCELLOUS_BONE
    tissue[disc] = T.DISC
    cv.paint(box, bone, tissue, BONE)
    cv.paint(box, canal & inside & (rho > 1.0), T.FLUID)


def _paint_ribs(cv):
    s = cv.subject
    a, b = s.cavity
    level = s.spine["level_mm"]
    z_t12 = s.spine["z_l1"] + level + 8.0  # head of the 12th rib
    box = cv.box((-a - 20.0, -b - 20.0, z_t12 - RIB_FALL - 2 * level), (a + 20.0, b + 20.0, _FAR))
    if box is None:
        return
    q = cv.coords(box)
    band = (inside_superellipse(q[0], q[1], a + RIB_BAND_MM, b + RIB_BAND_MM, b + RIB_BAND_MM)
            & ~inside_superellipse(q[0], q[1], a - RIB_BAND_MM, b - RIB_BAND_MM, b - RIB_BAND_MM))
    idx = np.nonzero(band)
    x, y, z = (c[idx] for c in q)
    theta = np.arctan2(np.abs(x), -(y + 20.0))  # 0 at the back, pi in front
    phase = (z + RIB_FALL * (theta / np.pi) ** 1.3 - z_t12) / level
    n = np.round(phase)
    dz = (phase - n) * level
    end = np.where(n == 0, RIB_END[0], np.where(n == 1, RIB_END[1], RIB_END_DEFAULT))
    tall = (np.abs(dz) < RIB_HALF_HEIGHT) & (n >= 0) & (theta > RIB_START)
    rib = tall & (theta < end)
    cartilage = tall & (n >= 2) & (theta >= end) & (theta < end + CARTILAGE_LEN)
    tissue = np.where(np.abs(dz) > RIB_HALF_HEIGHT - 2.0, T.CORTICAL_BONE, T.CANCELLOUS_BONE)
    sub_t = cv.tissue[box]
    sub_l = cv.labels[box]
    keep = cv.body[box][idx]
    sel = tuple(i[rib & keep] for i in idx)
    sub_t[sel] = tissue[rib & keep]
    sub_l[sel] = BONE
    sel = tuple(i[cartilage & keep] for i in idx)
    sub_t[sel] = T.CARTILAGE
    sub_l[sel] = 0
