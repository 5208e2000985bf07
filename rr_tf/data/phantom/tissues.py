"""Tissue classes and their Hounsfield units per contrast phase.

The anatomy is painted as a map of tissue classes (finer than the organ
labels: a kidney holds cortex, medulla and sinus fat); intensities are looked
up per class afterwards. Values follow docs/phantom.md section 4.
"""

import enum

PHASES = ("native", "arterial", "portal_venous")


class Tissue(enum.IntEnum):
    """Tissue classes of the tissue map (uint8)."""

    AIR = 0
    LUNG = 1
    FAT = 2
    MUSCLE = 3
    SKIN = 4
    LIVER = 5
    SPLEEN = 6
    KIDNEY_CORTEX = 7
    KIDNEY_MEDULLA = 8
    PANCREAS = 9
    FLUID = 10  # bile, gastric and bowel fluid, urine, CSF
    ARTERIAL_BLOOD = 11  # aorta and its branches
    CAVAL_BLOOD = 12  # inferior vena cava, renal veins
    PORTAL_BLOOD = 13  # portal, splenic, mesenteric and intrahepatic veins
    CARDIAC_BLOOD = 14
    MYOCARDIUM = 15
    BOWEL_WALL = 16
    STOMACH_WALL = 17
    STOOL = 18
    CORTICAL_BONE = 19
    CANCELLOUS_BONE = 20
    DISC = 21
    LUNG_VESSEL = 22
    CARTILAGE = 23


# Mean HU per phase (native, arterial, portal venous).
HU_TABLE = {
    Tissue.AIR: (-1000, -1000, -1000),
    Tissue.LUNG: (-840, -840, -840),
    Tissue.FAT: (-100, -100, -95),
    Tissue.MUSCLE: (45, 55, 60),
    Tissue.SKIN: (40, 50, 55),
    Tissue.LIVER: (50, 70, 90),
    Tissue.SPLEEN: (42, 115, 85),
    Tissue.KIDNEY_CORTEX: (32, 180, 165),
    Tissue.KIDNEY_MEDULLA: (28, 70, 150),
    Tissue.PANCREAS: (35, 110, 70),
    Tissue.FLUID: (5, 5, 5),
    Tissue.ARTERIAL_BLOOD: (42, 320, 165),
    Tissue.CAVAL_BLOOD: (40, 70, 100),
    Tissue.PORTAL_BLOOD: (40, 90, 165),
    Tissue.CARDIAC_BLOOD: (40, 260, 150),
    Tissue.MYOCARDIUM: (45, 120, 100),
    Tissue.BOWEL_WALL: (40, 85, 100),
    Tissue.STOMACH_WALL: (40, 90, 105),
    Tissue.STOOL: (-40, -40, -40),
    Tissue.CORTICAL_BONE: (900, 900, 900),
    Tissue.CANCELLOUS_BONE: (220, 220, 220),
    Tissue.DISC: (80, 85, 90),
    Tissue.LUNG_VESSEL: (40, 200, 140),
    Tissue.CARTILAGE: (110, 110, 115),
}

# Per-subject spread of a tissue's mean: uniform in +- this many HU.
HU_SPREAD = {
    Tissue.FAT: 5, Tissue.MUSCLE: 5, Tissue.SKIN: 5, Tissue.LIVER: 8, Tissue.SPLEEN: 8,
    Tissue.KIDNEY_CORTEX: 8, Tissue.KIDNEY_MEDULLA: 8, Tissue.PANCREAS: 10,
    Tissue.FLUID: 5, Tissue.ARTERIAL_BLOOD: 6, Tissue.CAVAL_BLOOD: 6,
    Tissue.PORTAL_BLOOD: 8, Tissue.CARDIAC_BLOOD: 8, Tissue.MYOCARDIUM: 6,
    Tissue.BOWEL_WALL: 8, Tissue.STOMACH_WALL: 8, Tissue.STOOL: 30,
    Tissue.CORTICAL_BONE: 150, Tissue.CANCELLOUS_BONE: 60, Tissue.DISC: 10,
    Tissue.LUNG: 30, Tissue.LUNG_VESSEL: 10, Tissue.CARTILAGE: 20,
}
# Contrast enhancement (phase value - native value) is multiplied by one
# per-subject factor (dose, timing, cardiac output) drawn in this range.
ENHANCEMENT_FACTOR_RANGE = (0.85, 1.15)

# Fine texture amplitude (sd, HU) per tissue: parenchymal grain, fat septa,
# mottled stool, trabecular bone. Tissues not listed are smooth (fluids, air).
FINE_TEXTURE_SD = {
    Tissue.LUNG: 35, Tissue.FAT: 8, Tissue.MUSCLE: 6, Tissue.SKIN: 6, Tissue.LIVER: 5,
    Tissue.SPLEEN: 5, Tissue.KIDNEY_CORTEX: 6, Tissue.KIDNEY_MEDULLA: 6,
    Tissue.PANCREAS: 10, Tissue.MYOCARDIUM: 6, Tissue.BOWEL_WALL: 8,
    Tissue.STOMACH_WALL: 8, Tissue.STOOL: 70, Tissue.CORTICAL_BONE: 80,
    Tissue.CANCELLOUS_BONE: 45, Tissue.DISC: 8, Tissue.CARTILAGE: 10,
}
# Tissues that carry the smooth low-frequency (sd 3-8 HU) intensity drift.
LOW_FREQUENCY_TISSUES = (
    Tissue.FAT, Tissue.MUSCLE, Tissue.LIVER, Tissue.SPLEEN, Tissue.KIDNEY_CORTEX,
    Tissue.KIDNEY_MEDULLA, Tissue.PANCREAS, Tissue.BOWEL_WALL, Tissue.STOMACH_WALL,
    Tissue.MYOCARDIUM,
)
LOW_FREQUENCY_SD_RANGE = (3.0, 8.0)

# Arterial-phase splenic "zebra" (arciform) enhancement amplitude, HU.
SPLEEN_ZEBRA_HU = 35.0
