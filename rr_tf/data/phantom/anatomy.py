"""Painting the anatomy: a tissue-class map and the organ label map.

Structures are drawn in a fixed order (body, fat / muscle, lungs, bowel,
liver, spleen, kidneys, stomach, pancreas, gallbladder, vessels, bone), each
overwriting what lies under it, so labels never overlap. Each structure is
evaluated only inside its bounding box, on the shared deformed patient-frame
coordinates, so all organs warp together and labels are sampled at voxel
centres without any resampling.
"""

import numpy as np

from rr_tf.data.phantom import midline
from rr_tf.data.phantom.canvas import (GALLBLADDER, KIDNEY_LEFT, KIDNEY_RIGHT, LIVER, PANCREAS,
                                       SPLEEN, STOMACH, Canvas, inside_superellipse)
from rr_tf.data.phantom.shapes import (ellipsoid_sd, local_coords, segment_sd, smooth_tube,
                                       smooth_union, superellipsoid_sd, tube_pieces)
from rr_tf.data.phantom.tissues import Tissue as T

SKIN_MM = 2.0
DIAPHRAGM_MM = 5.0
LIVER_HALF_AXES = (66.0, 78.0, 80.0)
LIVER_POWER = 2.1
LIVER_LEFT_HALF_AXES = (58.0, 26.0, 32.0)
SPLEEN_HALF_AXES = (24.0, 52.0, 56.0)
SPLEEN_HILUM = ((-30.0, 0.0, 0.0), (18.0, 28.0, 36.0))
KIDNEY_HALF_AXES = (26.0, 22.0, 55.0)
KIDNEY_CORTEX_MM = 7.0
# Bounds (mm) of the surface offset that brings the liver / spleen to their volume.
VOLUME_OFFSET_MM = (-6.0, 18.0)
# Vessel-network half-width (units of the medium band-pass fields).
LIVER_VESSEL_WIDTH = 0.32
LUNG_VESSEL_WIDTH = 0.22


def paint_body(cv):
    """Skin, subcutaneous fat, muscle ring, visceral fat, paraspinal and psoas muscles.

    Sets ``cv.body``, ``cv.cavity`` and ``cv.blocked`` (spine and back muscles,
    excluded from lungs and viscera).
    """
    s = cv.subject
    x, y, z = cv.q
    a, b = s.cavity
    f_lat, f_ant, f_post = s.fat
    m = s.muscle_mm
    cv.body = inside_superellipse(x, y, a + m + f_lat, b + m + f_ant, b + m + f_post)
    np.copyto(cv.tissue, np.uint8(T.SKIN), where=cv.body)
    fat = inside_superellipse(x, y, a + m + f_lat - SKIN_MM, b + m + f_ant - SKIN_MM,
                               b + m + f_post - SKIN_MM)
    np.copyto(cv.tissue, np.uint8(T.FAT), where=fat)
    muscle = inside_superellipse(x, y, a + m, b + m, b + m)
    np.copyto(cv.tissue, np.uint8(T.MUSCLE), where=muscle)
    cv.cavity = inside_superellipse(x, y, a, b, b)
    np.copyto(cv.tissue, np.uint8(T.FAT), where=cv.cavity)
    cv.blocked = np.zeros(cv.grid.shape, bool)
    cv.psoas = np.zeros(cv.grid.shape, bool)
    midline.paint_back_muscles(cv)


def _diaphragm_height(cv, x, y):
    """Height (patient z) of the diaphragm above (x, y): the higher of two domes."""
    d = cv.subject.domes
    sa, sb, drop = d["spread"]
    heights = []
    for key in ("right", "left"):
        cx, cy, h = d[key]
        heights.append(h - drop * (((x - cx) / sa) ** 2 + ((y - cy) / sb) ** 2))
    return np.maximum(*heights)


def paint_thorax(cv):
    """Diaphragm, lung bases with vessels, mediastinum and heart; sets ``cv.abdomen``."""
    s = cv.subject
    x, y, z = cv.q
    zd = _diaphragm_height(cv, x, y)
    above = z > zd
    open_cavity = cv.cavity & ~cv.blocked
    cv.abdomen = open_cavity & ~above
    thorax = open_cavity & above
    np.copyto(cv.tissue, np.uint8(T.MUSCLE), where=thorax)  # diaphragm, then lungs above it
    xs, ys, _ = cv.spine_relative(Ellipsis)
    # Posterior mediastinum: a wedge in front of the spine (aorta, oesophagus).
    mediastinum = (np.abs(xs + 6.0) < 16.0 + 0.3 * np.maximum(ys, 0.0)) & (ys < 60.0)
    lung = thorax & (z > zd + DIAPHRAGM_MM) & ~mediastinum
    med = cv.fields.medium
    vessel = (np.abs(med[0]) < LUNG_VESSEL_WIDTH) & (np.abs(med[1]) < LUNG_VESSEL_WIDTH)
    np.copyto(cv.tissue, np.uint8(T.LUNG), where=lung & ~vessel)
    np.copyto(cv.tissue, np.uint8(T.LUNG_VESSEL), where=lung & vessel)
    # Heart on the central tendon, wrapped in pericardial fat.
    pose = s.poses["heart"]
    half = np.array([62.0, 48.0, 55.0]) * pose.scale
    box = cv.box(pose.centre - half - 8, pose.centre + half + 8)
    if box is not None:
        q = cv.coords(box)
        sd = ellipsoid_sd(local_coords(q, pose.centre, pose.rot), half)
        allowed = thorax[box] & (q[2] > zd[box] + DIAPHRAGM_MM)
        cv.paint(box, allowed & (sd < 6.0), T.FAT)
        cv.paint(box, allowed & (sd < 0.0), T.MYOCARDIUM)
        cv.paint(box, allowed & (sd < -9.0), T.CARDIAC_BLOOD)


def paint_bowel(cv):
    """Small-bowel loops, colon frame and duodenum (all unlabelled context)."""
    s = cv.subject
    x, y, z = cv.q
    a, b = s.cavity
    med = cv.fields.medium
    region_top = s.spine["z_l1"] + 25.0
    if s.bowel_width > 0:
        box = cv.box((-a, -b, -400.0), (a, b, region_top))
        if box is not None:
            q = cv.coords(box)
            ys = cv.spine_relative(box)[1]
            region = (cv.abdomen[box] & ~cv.psoas[box] & (ys > 12.0)
                      & (q[2] < s.spine["z_l1"] + 10.0 - 0.15 * q[0]))
            b1, b2 = (f[box] for f in cv.fields.bowel)
            level = np.maximum(np.abs(b1), np.abs(b2))
            w = np.float32(0.45 * s.bowel_width)
            c = cv.fields.contents[box]
            cv.paint(box, region & (level < w), T.BOWEL_WALL)
            lumen = region & (level < 0.62 * w) & (c > -0.7)
            cv.paint(box, lumen, np.where(c > s.contents["bowel_gas"], T.AIR, T.FLUID))

    def colon_contents(q, t, seg, box):
        a_, b_, ra, rb = seg
        y_centre = np.float32(a_[1]) + t * np.float32(b_[1] - a_[1])
        radius = np.float32(ra) + t * np.float32(rb - ra)
        above_level = q[1] - y_centre > radius * np.float32(s.contents["colon_gas"])
        gas = above_level | (med[2][box] > 1.0)  # gas cap and bubbles in the stool
        return np.where(gas, T.AIR, T.STOOL)

    points, radii = smooth_tube(*s.tubes["colon"])
    cv.paint_tube(points, radii, [(0.0, T.BOWEL_WALL), (3.0, colon_contents)],
                       cv.abdomen, rough=1.0)

    air_y = s.contents["stomach_air_y"]

    def duodenal_contents(q, t, seg, box):
        return np.where(q[1] > air_y, T.AIR, T.FLUID)

    cv.paint_tube(*smooth_tube(*s.tubes["duodenum"]),
                  [(0.0, T.BOWEL_WALL), (3.0, duodenal_contents)], cv.abdomen)


def _mask_with_volume(cv, sd, allowed, litres):
    """``allowed & (sd <= delta)`` with the offset delta that gives ``litres`` (world).

    The organ's primitives set its shape; moving its surface by delta (within
    VOLUME_OFFSET_MM) absorbs what the cuts by body wall and diaphragm took.
    """
    values = sd[allowed]
    if values.size == 0:
        return allowed
    voxel_litres = float(np.prod(cv.grid.spacing)) * 1e-6
    k = int(np.clip(round(litres / voxel_litres), 1, values.size))
    delta = np.clip(np.partition(values, k - 1)[k - 1], *VOLUME_OFFSET_MM)
    return allowed & (sd <= delta)


def paint_liver(cv):
    """Right lobe (super-ellipsoid) + left lobe, cut below by a sloping plane; vessels."""
    s = cv.subject
    right, left = s.poses["liver"], s.poses["liver_left"]
    ext_r = np.array(LIVER_HALF_AXES) * right.scale * 1.3
    ext_l = np.array(LIVER_LEFT_HALF_AXES) * left.scale * 1.3
    lo = np.minimum(right.centre - ext_r, left.centre - ext_l)
    hi = np.maximum(right.centre + ext_r, left.centre + ext_l)
    box = cv.box(lo, hi)
    if box is None:
        return
    q = cv.coords(box)
    u = local_coords(q, right.centre, right.rot, right.scale)
    sd = superellipsoid_sd(u, LIVER_HALF_AXES, LIVER_POWER)
    ul = local_coords(q, left.centre, left.rot, left.scale)
    sd = smooth_union(sd, ellipsoid_sd(ul, LIVER_LEFT_HALF_AXES), 20.0) * np.float32(right.scale)
    # Inferior border: lowest laterally on the right, rising medially and anteriorly.
    w_inf = -70.0 + 0.45 * (40.0 - u[0]) + 0.25 * u[1]
    sd = np.maximum(sd, (w_inf - u[2]) * np.float32(0.85 * right.scale))
    mask = _mask_with_volume(cv, sd + cv.irregularity[box], cv.abdomen[box], s.volumes["liver"])
    med = cv.fields.medium
    width = np.float32(LIVER_VESSEL_WIDTH)
    vessel = (np.abs(med[0][box]) < width) & (np.abs(med[1][box]) < width)
    cv.paint(box, mask, np.where(vessel, T.PORTAL_BLOOD, T.LIVER), LIVER)


def paint_spleen(cv):
    """Ellipsoid minus a hilar ellipsoid: a crescent against the left posterior wall."""
    pose = cv.subject.poses["spleen"]
    ext = np.array(SPLEEN_HALF_AXES).max() * pose.scale
    box = cv.box(pose.centre - ext, pose.centre + ext)
    if box is None:
        return
    u = local_coords(cv.coords(box), pose.centre, pose.rot, pose.scale)
    hc, hh = SPLEEN_HILUM
    hilum = ellipsoid_sd([u[i] - np.float32(hc[i]) for i in range(3)], hh)
    sd = np.maximum(ellipsoid_sd(u, SPLEEN_HALF_AXES), -hilum) * np.float32(pose.scale)
    mask = _mask_with_volume(cv, sd + cv.irregularity[box], cv.abdomen[box],
                             cv.subject.volumes["spleen"])
    cv.paint(box, mask, T.SPLEEN, SPLEEN)


def paint_kidneys(cv):
    """Tilted ellipsoids: cortex, medullary pyramids, sinus fat and pelvis, hilar notch."""
    for name, label in (("kidney_right", KIDNEY_RIGHT), ("kidney_left", KIDNEY_LEFT)):
        pose = cv.subject.poses[name]
        ext = max(KIDNEY_HALF_AXES) * pose.scale
        box = cv.box(pose.centre - ext, pose.centre + ext)
        if box is None:
            continue
        u = local_coords(cv.coords(box), pose.centre, pose.rot, pose.scale)
        a, b, c = KIDNEY_HALF_AXES
        sd = ellipsoid_sd(u, KIDNEY_HALF_AXES) * np.float32(pose.scale)
        sinus = ellipsoid_sd([u[0] + np.float32(0.55 * a), u[1], u[2]],
                             (0.55 * a, 0.5 * b, 0.55 * c))
        pelvis = ellipsoid_sd([u[0] + np.float32(0.75 * a), u[1], u[2] + 4.0],
                              (0.3 * a, 0.28 * b, 0.25 * c))
        kidney = (sd + 0.5 * cv.irregularity[box] < 0) & cv.abdomen[box]
        kidney &= ~((sinus < 0) & (u[0] < -0.62 * a))  # hilar notch opens medially
        phi = np.arctan2(u[1], u[0])
        pyramid = (sd < -KIDNEY_CORTEX_MM) & (np.cos(5.0 * phi + 0.1 * u[2]) > -0.2)
        tissue = np.where(pyramid, T.KIDNEY_MEDULLA, T.KIDNEY_CORTEX)
        tissue[sinus < 0] = T.FAT
        tissue[pelvis < 0] = T.FLUID
        cv.paint(box, kidney, tissue, label)


def paint_stomach(cv):
    """Fundus-body-antrum tube: wall, fluid, and gas above an air-fluid level."""
    s = cv.subject
    air_y = s.contents["stomach_air_y"]

    def contents(q, t, seg, box):
        return np.where(q[1] > air_y, T.AIR, T.FLUID)

    cv.paint_tube(*smooth_tube(*s.tubes["stomach"]), [(0.0, T.STOMACH_WALL), (4.0, contents)],
                  cv.abdomen, STOMACH, rough=1.0)


def paint_pancreas(cv):
    """Lobulated tube from head to tail, with fatty clefts between lobules."""
    s = cv.subject
    med = cv.fields.medium

    def parenchyma(q, t, seg, box):
        return np.where(med[2][box] > s.contents["pancreas_fat"], T.FAT, T.PANCREAS)

    for a, b, ra, rb, lo, hi in tube_pieces(*smooth_tube(*s.tubes["pancreas"], 4)):
        box = cv.box(lo, hi)
        if box is None:
            continue
        q = cv.coords(box)
        sd, t = segment_sd(q, a, b, ra, rb)
        sd += 1.5 * med[0][box]  # lobulated contour
        cv.paint(box, (sd < 0) & cv.abdomen[box], parenchyma(q, t, None, box), PANCREAS)


def paint_gallbladder(cv):
    """Pear-shaped sac under the liver: thin wall around bile."""
    s = cv.subject
    if not s.gallbladder_present:
        return
    cv.paint_tube(*smooth_tube(*s.tubes["gallbladder"]), [(0.0, T.BOWEL_WALL), (2.5, T.FLUID)],
                  cv.abdomen, GALLBLADDER)


def build_anatomy(grid, subject, q, fields):
    """Paint every structure; returns (tissue uint8, labels uint8)."""
    cv = Canvas(grid, subject, q, fields)
    paint_body(cv)
    paint_thorax(cv)
    paint_bowel(cv)
    paint_liver(cv)
    paint_spleen(cv)
    paint_kidneys(cv)
    paint_stomach(cv)
    paint_pancreas(cv)
    paint_gallbladder(cv)
    midline.paint_vessels(cv)
    midline.paint_bones(cv)
    return cv.tissue, cv.labels
