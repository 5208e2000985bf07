"""Hounsfield units from the tissue map: per-subject means, then texture."""

import numpy as np

from rr_tf.data.phantom.tissues import (ENHANCEMENT_FACTOR_RANGE, FINE_TEXTURE_SD, HU_SPREAD,
                                        HU_TABLE, LOW_FREQUENCY_SD_RANGE, LOW_FREQUENCY_TISSUES,
                                        PHASES, SPLEEN_ZEBRA_HU, Tissue)

_LUT_SIZE = 256


def draw_tissue_hu(rng, phase):
    """Per-subject lookup tables indexed by tissue class (float32, 256 entries).

    Returns ``(mean, fine_sd, low_sd)``: the mean HU of each tissue (table
    value, contrast enhancement scaled by one per-subject factor, plus a
    uniform per-tissue spread), the fine texture sd, and the weight of the
    low-frequency drift (sd 3-8 HU, drawn per subject, soft tissues only).
    """
    column = PHASES.index(phase)
    enhancement = rng.uniform(*ENHANCEMENT_FACTOR_RANGE)
    mean = np.zeros(_LUT_SIZE, np.float32)
    for tissue in Tissue:
        native = HU_TABLE[tissue][0]
        value = native + (HU_TABLE[tissue][column] - native) * enhancement
        spread = HU_SPREAD.get(tissue, 0)
        mean[tissue] = value + rng.uniform(-spread, spread)
    fine = np.zeros(_LUT_SIZE, np.float32)
    for tissue, sd in FINE_TEXTURE_SD.items():
        fine[tissue] = sd * rng.uniform(0.8, 1.2)
    low = np.zeros(_LUT_SIZE, np.float32)
    low[list(LOW_FREQUENCY_TISSUES)] = rng.uniform(*LOW_FREQUENCY_SD_RANGE)
    return mean, fine, low


def render_hu(tissue, phase, luts, fine, low, zebra):
    """Noise-free HU image (float32) of the tissue map.

    ``fine`` and ``low``: unit-sd texture fields (fine grain, smooth drift);
    ``zebra``: unit-sd band-pass field for the arterial-phase arciform
    enhancement of the spleen.
    """
    mean, fine_sd, low_sd = luts
    image = np.take(mean, tissue)
    image += np.take(fine_sd, tissue) * fine
    image += np.take(low_sd, tissue) * low
    if phase == "arterial":
        spleen = tissue == Tissue.SPLEEN
        image[spleen] += np.float32(SPLEEN_ZEBRA_HU) * np.tanh(1.5 * zebra[spleen])
    return image
