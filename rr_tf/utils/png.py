"""PNG figures without matplotlib: an encoder, a tiny bitmap font and a small
line-plot rasteriser."""

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


# 5-pixel-wide glyphs, one string of rows (top to bottom) each. Rows 0-6 sit
# above the baseline (capitals and digits fill them), rows 7-8 hold descenders;
# missing rows at the bottom are blank.
GLYPH_W, GLYPH_H, ADVANCE = 5, 9, 6
_GLYPHS = {
    " ": "",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": ".###. #...# ....# ..##. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "-": "..... ..... ..... .###. ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "±": "..#.. ..#.. ##### ..#.. ..#.. ..... #####",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "_": "..... ..... ..... ..... ..... ..... ..... #####",
    "'": "..#.. ..#.. .#...",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .#### #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
}


def _glyph(rows):
    g = np.zeros((GLYPH_H, GLYPH_W), bool)
    for r, row in enumerate(rows.split()):
        g[r] = [ch == "#" for ch in row]
    return g


FONT = {c: _glyph(rows) for c, rows in _GLYPHS.items()}
_BOX = _glyph("##### #...# #...# #...# #...# #...# #####")  # unknown characters


def text_width(text, scale=1):
    """Width in pixels that draw_text advances for ``text`` (ADVANCE per character)."""
    return len(text) * ADVANCE * max(1, int(scale))


def text_mask(text, scale=1):
    """bool [GLYPH_H * scale, text_width(text, scale)]: the pixels of ``text``."""
    scale = max(1, int(scale))
    m = np.zeros((GLYPH_H, ADVANCE * len(text)), bool)
    for i, c in enumerate(text):
        m[:, i * ADVANCE:i * ADVANCE + GLYPH_W] = FONT.get(c, _BOX)
    return m.repeat(scale, 0).repeat(scale, 1)


def _paste(img, mask, x, y, colour):
    """Set ``img`` to ``colour`` where ``mask`` (top-left at x, y) is true, clipped."""
    x, y = int(round(x)), int(round(y))
    y0, y1 = max(y, 0), min(y + mask.shape[0], img.shape[0])
    x0, x1 = max(x, 0), min(x + mask.shape[1], img.shape[1])
    if y0 < y1 and x0 < x1:
        img[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = colour


def draw_text(img, text, x, y, colour=(0, 0, 0), scale=1):
    """Draw ``text`` into ``img`` in place with its top-left corner at (x, y)
    (glyph cell GLYPH_H * scale tall, descenders included); anything off the
    canvas is clipped, unknown characters are drawn as boxes. Returns the
    width advanced, ``len(text) * ADVANCE * scale``."""
    _paste(img, text_mask(text, scale), x, y, colour)
    return text_width(text, scale)


def _fill(img, y0, y1, x0, x1, colour):
    """img[y0:y1, x0:x1] = colour, clipped to the canvas."""
    h, w = img.shape[:2]
    y0, y1, x0, x1 = (int(round(v)) for v in (y0, y1, x0, x1))
    img[max(y0, 0):max(min(y1, h), 0), max(x0, 0):max(min(x1, w), 0)] = colour


def _tick_labels(values):
    """Fewest decimals (up to 6) that put every label within 5% of a step of its value."""
    step = abs(values[1] - values[0]) if len(values) > 1 else 1.0
    for d in range(7):
        labels = [f"{round(v, d) + 0.0:.{d}f}" for v in values]
        if all(abs(float(s) - v) <= 0.05 * step for s, v in zip(labels, values)):
            break
    return labels


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_plot(series, x_values, y_range=(0.0, 1.0), size=(420, 600), margin=None, *,
              x_label=None, y_label=None, title=None, legend=True):
    """Rasterised line plot: ``series`` {name: [y per x, NaN = gap]} over the
    categorical ``x_values`` (equally spaced), gridlines every 0.1 of
    ``y_range`` with every second one labelled. ``size`` is (H, W);
    ``margin`` is one number or (top, right, bottom, left), by default just
    enough for the text. Draws the optional ``title``, ``x_label`` (centred
    below), ``y_label`` (rotated, left) and, if ``legend``, a legend box right
    of the plot. Returns (uint8 [H, W, 3], {name: colour})."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    lo, hi = y_range
    hi = hi if hi > lo else lo + 1.0
    grid = np.linspace(lo, hi, 11)
    y_ticks = _tick_labels(grid[::2])
    x_ticks = [f"{x:g}" if isinstance(x, (float, np.floating)) else str(x) for x in x_values]
    names = [str(name) for name in series]
    legend_w = 34 + text_width(max(names, key=len)) if legend and names else 0
    title_scale = 2 if text_width(title or "", 2) <= w - 20 else 1
    if margin is None:
        top = 12 + (GLYPH_H * title_scale + 10 if title else 0)
        right = 16 + (legend_w + 10 if legend_w else 0)
        bottom = 14 + GLYPH_H + (GLYPH_H + 6 if x_label else 0)
        left = 12 + text_width(max(y_ticks, key=len)) + (GLYPH_H + 8 if y_label else 0)
    else:
        top, right, bottom, left = (margin,) * 4 if np.isscalar(margin) else margin
    x_axis, x_end = h - bottom, w - right  # row of the x axis, right edge of the plot
    pad = 0.05 * (x_end - left)
    x_pix = np.linspace(left + pad, x_end - pad, max(len(x_values), 2))[:len(x_values)]

    def y_pix(v):
        return x_axis - (np.clip(v, lo, hi) - lo) / (hi - lo) * (x_axis - top)

    def centred(text, cx, y, scale=1):
        draw_text(img, text, max(cx - (text_width(text, scale) - scale) / 2, 2), y, scale=scale)

    for t in grid:
        yi = int(round(y_pix(t)))
        _fill(img, yi, yi + 1, left, x_end, (225, 225, 225))
    _fill(img, x_axis, x_axis + 1, left, x_end, 0)
    _fill(img, top, x_axis + 1, left, left + 1, 0)
    for t, label in zip(grid[::2], y_ticks):
        yi = int(round(y_pix(t)))
        _fill(img, yi, yi + 1, left - 4, left, 0)
        draw_text(img, label, left - 5 - text_width(label), yi - 3)
    for x, label in zip(x_pix, x_ticks):
        xi = int(round(x))
        _fill(img, x_axis, x_axis + 5, xi, xi + 1, 0)
        centred(label, xi, x_axis + 8)
    if x_label:
        centred(x_label, (left + x_end) / 2, x_axis + 14 + GLYPH_H)
    if y_label:
        mask = np.rot90(text_mask(y_label))  # reads bottom to top
        _paste(img, mask, max(left - 10 - text_width(max(y_ticks, key=len)) - GLYPH_H, 0),
               (top + x_axis - mask.shape[0]) / 2, (0, 0, 0))
    if title:
        centred(title, (left + x_end) / 2, 8, title_scale)

    colours = {}
    for k, (name, ys) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        colours[name] = colour
        pts = [(x, y_pix(y)) for x, y in zip(x_pix, ys) if y is not None and not np.isnan(y)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0, 1, n):
                xi, yi = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                _fill(img, yi - 1, yi + 1, xi - 1, xi + 1, colour)
        for x, y in pts:
            xi, yi = int(round(x)), int(round(y))
            _fill(img, yi - 3, yi + 4, xi - 3, xi + 4, colour)

    if legend_w:  # box right of the plot: a short line with a marker, then the name
        lx, rows = x_end + 12, 14
        _fill(img, top, top + 8 + rows * len(names), lx, lx + legend_w, (150, 150, 150))
        _fill(img, top + 1, top + 7 + rows * len(names), lx + 1, lx + legend_w - 1, 255)
        for i, (name, colour) in enumerate(zip(names, colours.values())):
            y = top + 5 + rows * i
            _fill(img, y + 3, y + 5, lx + 6, lx + 23, colour)
            _fill(img, y + 1, y + 7, lx + 12, lx + 18, colour)
            draw_text(img, name, lx + 28, y)
    return img, colours
