"""PNG figures without matplotlib: an encoder and a small line-plot rasteriser."""

import struct
import zlib

import numpy as np


def encode_png(rgb):
    """uint8 [H, W, 3] -> PNG bytes (8-bit truecolour, zlib; no TF/PIL needed)."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_plot(series, x_values, y_range=(0.0, 1.0), size=(360, 480), margin=30):
    """Rasterised line plot: ``series`` {name: [y per x, NaN = gap]} over the
    categorical ``x_values`` (equally spaced), gridlines every 0.1 of
    ``y_range``. Returns (uint8 [H, W, 3], {name: colour}); the legend is
    the colour map (written next to the figure by the caller)."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    lo, hi = y_range
    x_pix = np.linspace(margin, w - margin, max(len(x_values), 2))[:len(x_values)]

    def y_pix(v):
        return h - margin - (np.clip(v, lo, hi) - lo) / (hi - lo) * (h - 2 * margin)

    for t in np.linspace(lo, hi, 11):
        img[int(round(y_pix(t))), margin:w - margin] = (225, 225, 225)
    img[h - margin, margin:w - margin] = 0
    img[margin:h - margin + 1, margin] = 0
    for x in x_pix:
        img[h - margin:h - margin + 5, int(round(x))] = 0
    colours = {}
    for k, (name, ys) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        colours[name] = colour
        pts = [(x, y_pix(y)) for x, y in zip(x_pix, ys) if y is not None and not np.isnan(y)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0, 1, n):
                xi, yi = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                img[max(yi - 1, 0):yi + 1, max(xi - 1, 0):xi + 1] = colour
        for x, y in pts:
            xi, yi = int(round(x)), int(round(y))
            img[max(yi - 3, 0):yi + 4, max(xi - 3, 0):xi + 4] = colour
    return img, colours
