"""Label colours and overlay figures shared by ``launch/evaluate.py`` (PNG
grids of reference / prediction / errors) and the fine-tuning TensorBoard
panels (:func:`tensorboard_overlay`)."""

import numpy as np
from keras import ops

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
           (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
PANEL_HEIGHT = 160


def display_axial(a):
    """[x, y] RAS slice -> rows anterior at the top, patient's right on the
    viewer's left (radiological convention)."""
    return a.T[::-1, ::-1]


def resize_nearest(a, height, width):
    """Nearest-neighbour resize of a 2D (or 2D + channels) array."""
    rows = ((np.arange(height) + 0.5) * a.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * a.shape[1] / width).astype(int)
    return a[rows][:, cols]


def label_colours(labels2d, keep):
    """RGB [0, 1] of the labels in ``keep`` (others black)."""
    rgb = np.zeros(labels2d.shape + (3,), np.float32)
    for k in keep:
        rgb[labels2d == k] = np.asarray(PALETTE[(k - 1) % len(PALETTE)], np.float32) / 255.0
    return rgb


def render_case(view, labels, image2d=None, panel_height=PANEL_HEIGHT):
    """One figure row (float RGB in [0, 1]): [image |] reference | prediction
    with the reference contour | errors."""
    keep = list(labels)
    ref = np.where(np.isin(view["ref"], keep), view["ref"], 0)
    pred = np.where(np.isin(view["pred"], keep), view["pred"], 0)
    sx, sy = view["spacing"]
    nx, ny = ref.shape
    height = panel_height
    width = int(np.clip(round(height * (nx * sx) / (ny * sy)), 32, 4 * height))
    ref = resize_nearest(display_axial(ref), height, width)
    pred = resize_nearest(display_axial(pred), height, width)
    if image2d is not None:
        img = resize_nearest(display_axial(image2d.astype(np.float32)), height, width)
        if img.min() <= -500:  # CT in HU (air present): abdominal window W400 L40
            lo, hi = -160.0, 240.0
        else:
            lo, hi = np.percentile(img, [1, 99])
        gray = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    else:
        gray = np.zeros((height, width), np.float32)
    base = np.repeat(gray[..., None], 3, axis=-1)
    alpha = 0.55

    def overlay(lab):
        out = base.copy()
        fg = lab > 0
        out[fg] = (1 - alpha) * base[fg] + alpha * label_colours(lab, keep)[fg]
        return out

    ref_panel = overlay(ref)
    pred_panel = overlay(pred)
    contour = np.zeros_like(ref, bool)
    contour[:-1] |= ref[:-1] != ref[1:]
    contour[:, :-1] |= ref[:, :-1] != ref[:, 1:]
    pred_panel[contour] = 1.0
    err = 0.5 * base
    err[(ref > 0) & (pred == ref)] = (0.1, 0.8, 0.2)
    err[(pred > 0) & (pred != ref)] = (0.9, 0.1, 0.1)
    err[(ref > 0) & (pred == 0)] = (0.1, 0.3, 1.0)
    panels = ([base] if image2d is not None else []) + [ref_panel, pred_panel, err]
    return panels


def figure_grid(rows, gap=4, background=0.16):
    """Panels (list per row) -> one uint8 RGB image with gaps."""
    width = max(sum(p.shape[1] for p in row) + gap * (len(row) + 1) for row in rows)
    height = sum(row[0].shape[0] for row in rows) + gap * (len(rows) + 1)
    canvas = np.full((height, width, 3), background, np.float32)
    y = gap
    for row in rows:
        x = gap
        for panel in row:
            h, w = panel.shape[:2]
            canvas[y:y + h, x:x + w] = panel
            x += w + gap
        y += row[0].shape[0] + gap
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)


def colour_table(num_classes):
    """``[num_classes, 3]`` float RGB in [0, 1]: background black, label
    ``k`` the palette colour ``PALETTE[(k - 1) % len(PALETTE)]``."""
    rows = [(0, 0, 0)] + [PALETTE[(k - 1) % len(PALETTE)] for k in range(1, num_classes)]
    return np.asarray(rows, np.float32) / 255.0


def tensorboard_overlay(image2d, labels2d, num_classes, alpha=0.55):
    """Graph-side overlay of integer labels on a grey image (keras.ops):
    ``image2d`` ``[B, H, W, 1]`` in [0, 1], ``labels2d`` ``[B, H, W]``; returns
    ``[B, H, W, 3]`` with each labelled voxel blended with its palette
    colour (:func:`colour_table`) and background left grey."""
    table = ops.convert_to_tensor(colour_table(num_classes))
    labels = ops.cast(labels2d, "int32")
    colours = ops.take(table, labels, axis=0)
    grey = ops.repeat(ops.clip(ops.cast(image2d, "float32"), 0.0, 1.0), 3, axis=-1)
    fg = ops.cast(labels > 0, "float32")[..., None] * alpha
    return grey * (1.0 - fg) + colours * fg
