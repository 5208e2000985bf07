"""Largest-connected-component postprocessing and its per-class choice."""

import numpy as np

from rr_tf.postprocess import choose_classes, keep_largest_component


def _blobs():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:10, 2:10, 2:10] = 1        # class 1: big body ...
    lab[15:17, 15:17, 15:17] = 1     # ... and a stray island
    lab[12, 2:6, 2] = 2              # class 2: two separate parts of the same size order
    lab[12, 10:13, 2] = 2
    lab[10, 10, 10] = 3              # touches class-1 body only diagonally: stays one component
    lab[11, 11, 11] = 3
    return lab


def test_keeps_only_the_largest_component_of_the_chosen_classes():
    lab = _blobs()
    out = keep_largest_component(lab, [1, 3])
    assert (out == 1).sum() == 8 ** 3 and out[16, 16, 16] == 0    # island removed
    assert (out == 2).sum() == (lab == 2).sum()                    # class 2 not chosen: unchanged
    assert (out == 3).sum() == 2                                   # 26-connected: both voxels kept
    out2 = keep_largest_component(lab, [2])
    assert (out2 == 2).sum() == 4 and out2[12, 11, 2] == 0         # the 3-voxel part removed
    assert np.array_equal(keep_largest_component(lab, []), lab)
    assert lab[16, 16, 16] == 1                                    # input untouched


def test_choice_keeps_a_class_only_where_validation_dice_rises():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:10, 2:10, 2:10] = 1
    ref[12, 2:6, 2] = 2
    ref[12, 10:13, 2] = 2          # class 2 truly has two parts
    pred = ref.copy()
    pred[15:17, 15:17, 15:17] = 1  # a false island of class 1
    chosen, table = choose_classes([pred], [ref], [1, 2, 3])
    assert chosen == [1]
    without, with_ = table[1]
    assert with_ == 1.0 and abs(without - 2 * 512 / (520 + 512)) < 1e-9
    assert table[2][1] < table[2][0]  # removing a true part lowers Dice: not chosen
    assert np.isnan(table[3][0])      # absent everywhere: not scored
