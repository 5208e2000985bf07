"""Label-map postprocessing: keep each organ's largest connected component
(nnU-Net's postprocessing), applied only to the classes for which it helped
on the validation cases.

An organ such as the liver or the spleen is one connected body; a segmenter
trained on few cases often adds small islands of the same class elsewhere
(look-alike tissue), which cost Dice and, far more, HD95. Removing all but
the largest component of such a class fixes that, but hurts a class that
really has several parts (bone: vertebrae and ribs are separate components)
or a thin one that the prediction breaks up. So the choice is made per
class on validation data, as nnU-Net does: :func:`choose_classes` keeps a
class when the postprocessed validation Dice of that class is higher than
without it.
"""

import numpy as np
from scipy import ndimage

# 26-connectivity: voxels touching at an edge or a corner are one component
# (a thin oblique vessel stays one piece).
_STRUCTURE = np.ones((3, 3, 3), bool)


def keep_largest_component(labels, classes):
    """``labels`` with, for every class in ``classes``, all voxels outside
    that class's largest connected component set to background (0). Other
    classes are unchanged. Returns a new array."""
    out = np.array(labels, copy=True)
    for c in classes:
        mask = out == c
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=_STRUCTURE)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[mask & (comp != int(np.argmax(sizes)))] = 0
    return out


def choose_classes(predictions, references, classes):
    """The classes whose mean validation Dice rises when only their largest
    component is kept. ``predictions`` / ``references``: label maps of the
    validation cases (a class absent from both maps of a case is not
    scored in it). Returns ``(chosen, table)`` with ``table[c] =
    (dice_without, dice_with)``, case means, NaN when no case scores ``c``."""
    from rr_tf.metrics import dice

    before = {c: [] for c in classes}
    after = {c: [] for c in classes}
    for pred, ref in zip(predictions, references):
        post = keep_largest_component(pred, classes)
        for c in classes:
            r = ref == c
            if not r.any() and not (pred == c).any():
                continue
            before[c].append(float(dice(pred == c, r)))
            after[c].append(float(dice(post == c, r)))
    table, chosen = {}, []
    for c in classes:
        b = float(np.mean(before[c])) if before[c] else float("nan")
        a = float(np.mean(after[c])) if after[c] else float("nan")
        table[int(c)] = (b, a)
        if before[c] and a > b:
            chosen.append(int(c))
    return chosen, table
