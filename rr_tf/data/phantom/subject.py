"""Drawing one subject: body habitus, organ poses and sizes, contrast phase.

Positions are in the patient frame (see shapes.py), in millimetres, for a
standard abdominal cavity of half-axes 125 mm (left-right) x 90 mm
(antero-posterior); they are stretched with the subject's own cavity.
Organs that touch each other are placed relative to one another (the
gallbladder under the liver, the pancreatic tail at the splenic hilum, the
duodenum around the pancreatic head), so relations survive the jitter.
"""

import dataclasses

import numpy as np

from rr_tf.data.phantom.shapes import PatientFrame, rotation
from rr_tf.data.phantom.tissues import PHASES

STANDARD_CAVITY_MM = (125.0, 90.0)
# Gaussian correlation length (mm) of the smooth displacement field.
DEFORMATION_CORR_MM = 70.0
# Liver / spleen volume targets (litres, world). The patient-frame volume at
# organ scale s, after the cuts by diaphragm and body wall, was measured as
# about s^3 (c0 - c1 s) litres (larger organs lose more to the cuts).
LIVER_LITRES_RANGE = (1.1, 2.0)
LIVER_VOLUME_MODEL = (3.03, 1.79)
SPLEEN_LITRES_RANGE = (0.12, 0.35)
SPLEEN_VOLUME_MODEL = (0.35, 0.18)
ORGAN_SCALE_RANGE = (0.75, 1.3)
# Fraction of the field of view the body may fill (no truncation).
MAX_BODY_FILL = 0.94


@dataclasses.dataclass
class Pose:
    """Placement of one organ: centre (patient mm), rotation matrix, scale."""

    centre: np.ndarray
    rot: np.ndarray
    scale: float = 1.0


@dataclasses.dataclass
class Subject:
    """All anatomical parameters of one phantom (patient frame, mm)."""

    phase: str
    frame: PatientFrame
    deformation_mm: float
    irregularity_mm: float
    cavity: tuple  # (a, b): half-axes of the abdominal cavity
    fat: tuple  # subcutaneous fat thickness (lateral, anterior, posterior)
    muscle_mm: float
    spine: dict  # y0, lordosis, x_amp, x_phase, level_mm, z_l1
    domes: dict  # right / left: (x, y, height); spread (A, B, drop)
    poses: dict  # organ name -> Pose
    volumes: dict  # target world volume (litres) of the liver and the spleen
    tubes: dict  # name -> (points (K, 3), radii (K,))
    vessels: dict  # aorta radius, ivc half-axes, bifurcation z
    gallbladder_present: bool
    bowel_width: float  # field-units half-width of small bowel loops (0: none)
    contents: dict  # gas / fat levels: stomach_air_y, colon_gas, bowel_gas, pancreas_fat

    def spine_xy(self, z):
        """Centre (x, y) of the vertebral bodies at height ``z`` (array or float)."""
        s = self.spine
        y = (s["y0"] + s["lordosis"] * np.exp(-(((z + 80.0) / 90.0) ** 2))
             - 0.12 * np.maximum(z - 60.0, 0.0))
        x = s["x_amp"] * np.sin(z / 150.0 + s["x_phase"])
        return x, y


def _uniform(rng, lo_hi):
    return float(rng.uniform(*lo_hi))


def _scale_for_volume(litres, g, model):
    """Organ scale in ORGAN_SCALE_RANGE whose modelled world volume is nearest ``litres``."""
    s = np.linspace(*ORGAN_SCALE_RANGE, 221)
    volume = g**3 * s**3 * (model[0] - model[1] * s)
    return float(s[np.argmin(np.abs(volume - litres))])


def _jitter(rng, mm):
    return rng.uniform(-mm, mm, 3)


def _small_rotation(rng, base=(0.0, 0.0, 0.0), deg=8.0):
    return rotation(*(np.asarray(base) + rng.uniform(-deg, deg, 3)))


def draw_subject(rng, config, fov):
    """Draw a Subject from ``rng`` for a world field of view ``fov`` (mm, 3)."""
    phase_u = rng.random()
    probs = np.asarray(config.phase_probabilities, np.float64)
    drawn = PHASES[int(np.searchsorted(np.cumsum(probs / probs.sum()), phase_u))]
    phase = config.phase or drawn

    # Body habitus: cavity, muscle ring, subcutaneous fat.
    a_c = STANDARD_CAVITY_MM[0] * rng.uniform(0.92, 1.08)
    b_c = STANDARD_CAVITY_MM[1] * rng.uniform(0.92, 1.08)
    muscle = rng.uniform(6.0, 14.0)
    fat_base = rng.uniform(8.0, 40.0)
    fat = (fat_base * rng.uniform(0.8, 1.2), fat_base * rng.uniform(0.9, 1.4),
           fat_base * rng.uniform(0.4, 0.8))
    half_width = a_c + muscle + fat[0]
    half_depth = b_c + muscle + 0.5 * (fat[1] + fat[2])
    g = rng.uniform(0.85, 1.15)
    g = min(g, MAX_BODY_FILL * fov[0] / 2 / half_width,
            MAX_BODY_FILL * fov[1] / 2 / (half_depth + 10.0))
    z_centre = rng.uniform(5.0, 25.0)
    shift = np.array([rng.uniform(-10, 10),
                      -g * 0.5 * (fat[1] - fat[2]) + rng.uniform(-10, 10),
                      -g * z_centre])
    body_rot = rotation(rng.uniform(-3, 3), rng.uniform(-2, 2), rng.uniform(-4, 4))
    deformation = _uniform(rng, config.deformation_mm_range)
    frame = PatientFrame(scale=float(g), rot=body_rot, shift=shift,
                         max_disp=np.full(3, 4.5 * deformation))

    cx, cy = a_c / STANDARD_CAVITY_MM[0], b_c / STANDARD_CAVITY_MM[1]

    def at(x, y, z):
        return np.array([x * cx, y * cy, z])

    jit = config.position_jitter_mm
    spine = dict(y0=-b_c + 50.0 + rng.uniform(-4, 4), lordosis=rng.uniform(6, 16),
                 x_amp=rng.uniform(0, 6), x_phase=rng.uniform(0, 2 * np.pi),
                 level_mm=rng.uniform(31, 37), z_l1=rng.uniform(0, 15))
    h_right = rng.uniform(95, 115)
    domes = dict(right=(55 * cx, -5 * cy, h_right),
                 left=(-55 * cx, -12 * cy, h_right - rng.uniform(5, 25)),
                 spread=(85 * cx, 95 * cy, rng.uniform(55, 75)))

    poses = {}
    tubes = {}
    # Liver: volume target -> scale.
    liver_litres = _uniform(rng, LIVER_LITRES_RANGE)
    s_liver = _scale_for_volume(liver_litres, g, LIVER_VOLUME_MODEL)
    liver_c = at(62, -2, 38) + _jitter(rng, jit) * (1, 1, 0.5)
    poses["liver"] = Pose(liver_c, _small_rotation(rng, deg=6), s_liver)
    # Left lobe: its own shape, attached to the right lobe.
    poses["liver_left"] = Pose(liver_c + at(-74, 50, 20) + _jitter(rng, 0.5 * jit),
                               _small_rotation(rng, (0, 0, 20), 8), s_liver)
    # Spleen.
    spleen_litres = _uniform(rng, SPLEEN_LITRES_RANGE)
    s_spleen = _scale_for_volume(spleen_litres, g, SPLEEN_VOLUME_MODEL)
    spleen_c = at(-90, -30, 48) + _jitter(rng, jit)
    poses["spleen"] = Pose(spleen_c, _small_rotation(rng, (-20, 0, 215), 10), s_spleen)
    # Kidneys: paravertebral, the left one about 15 mm higher.
    k_scale = rng.uniform(0.95, 1.1) / g**0.6  # kidney volume grows only as g^1.2
    z_kid = rng.uniform(-32, -18)
    poses["kidney_right"] = Pose(at(68, -42, z_kid) + _jitter(rng, jit) * (0.6, 0.5, 0.4),
                                 _small_rotation(rng, (10, -12, -30), 6),
                                 float(k_scale * rng.uniform(0.93, 1.07)))
    poses["kidney_left"] = Pose(at(-68, -42, z_kid + rng.uniform(10, 20))
                                + _jitter(rng, jit) * (0.6, 0.5, 0.2),
                                _small_rotation(rng, (-10, -12, 210), 6),
                                float(k_scale * rng.uniform(0.93, 1.07)))
    # Stomach: fundus under the left dome to the pylorus.
    st_shift = _jitter(rng, jit)
    st_scale = rng.uniform(0.8, 1.2)
    stomach = np.array([at(-48, -14, 64), at(-50, 8, 44), at(-42, 30, 24),
                        at(-18, 44, 6), at(6, 44, -2), at(24, 30, -2)]) + st_shift
    st_radii = np.array([32, 32, 28, 22, 16, 11]) * st_scale
    tubes["stomach"] = (stomach, st_radii)
    # Pancreas: head by the duodenum, tail at the splenic hilum.
    p_shift = _jitter(rng, 0.6 * jit) * (1, 0.5, 1)
    tail = spleen_c + rotation(0, 0, 215) @ np.array([-28.0, 0.0, -10.0])
    pancreas = np.array([at(30, 12, -18) + p_shift, at(8, 22, -2) + p_shift,
                         at(-25, 18, 8) + p_shift, at(-55, 6, 18) + 0.5 * p_shift,
                         tail + _jitter(rng, 4)])
    p_scale = rng.uniform(0.8, 1.2)
    tubes["pancreas"] = (pancreas, np.array([15.0, 10.0, 11.0, 10.0, 8.0]) * p_scale)
    # Duodenum: C-loop around the pancreatic head, from the pylorus.
    head = pancreas[0]
    tubes["duodenum"] = (np.array([stomach[-1], head + (20, 16, 16), head + (24, -6, -8),
                                   head + (20, -8, -40), head + (-10, -12, -52),
                                   head + (-40, -6, -50), head + (-58, 2, -30)]),
                         np.array([11, 12, 12, 12, 11, 11, 10.0]) * rng.uniform(0.85, 1.15))
    # Gallbladder: in the liver's frame, neck at the porta hepatis, fundus just
    # beyond the inferior liver edge.
    liver = poses["liver"]
    gb_local = np.array([[-22.0, 10.0, -10.0], [-12.0, 28.0, -24.0], [-5.0, 45.0, -38.0]])
    gb_local += _jitter(rng, 0.4 * jit)
    gb_scale = rng.uniform(0.75, 1.3)
    tubes["gallbladder"] = (liver.centre + (liver.scale * gb_local) @ liver.rot.T,
                            np.array([6.0, 13.0, 16.0]) * gb_scale)
    gallbladder_present = bool(rng.random() >= config.gallbladder_absent_probability)
    # Colon frame: caecum, ascending, transverse (sagging), descending, sigmoid.
    colon = np.array([at(82, 20, -150), at(96, -5, -100), at(96, -8, -40), at(84, 15, -15),
                      at(45, 68, -40), at(-10, 75, -55), at(-55, 58, -20), at(-92, 5, 30),
                      at(-102, -10, -20), at(-98, -8, -110), at(-60, 30, -170),
                      at(-10, 20, -190), at(0, -55, -230)])
    colon = colon + rng.uniform(-0.6 * jit, 0.6 * jit, colon.shape)
    colon_r = np.array([30, 28, 26, 24, 22, 22, 22, 20, 19, 18, 16, 16, 18.0])
    tubes["colon"] = (colon, colon_r * rng.uniform(0.8, 1.15))
    # Heart, on the central tendon of the diaphragm.
    poses["heart"] = Pose(at(-25, 30, domes["left"][2] + 55) + _jitter(rng, 8),
                          _small_rotation(rng, (0, 0, 30), 8), float(rng.uniform(0.9, 1.1)))
    vessels = dict(aorta_r=rng.uniform(9, 13), ivc=(rng.uniform(11, 15), rng.uniform(7, 10)),
                   z_bif=spine["z_l1"] - 3.4 * spine["level_mm"] + rng.uniform(-10, 10))

    return Subject(
        phase=phase, frame=frame, deformation_mm=deformation,
        irregularity_mm=rng.uniform(1.5, 3.0), cavity=(a_c, b_c), fat=fat,
        muscle_mm=muscle, spine=spine, domes=domes, poses=poses,
        volumes=dict(liver=liver_litres, spleen=spleen_litres), tubes=tubes,
        vessels=vessels, gallbladder_present=gallbladder_present,
        bowel_width=config.bowel_density * rng.uniform(0.8, 1.2),
        contents=dict(stomach_air_y=stomach[2, 1] + rng.uniform(-5, 30),
                      colon_gas=rng.uniform(0.0, 0.9), bowel_gas=rng.uniform(0.9, 1.6),
                      pancreas_fat=rng.uniform(1.0, 2.2)),
    )
