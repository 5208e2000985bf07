import struct
import zlib

import numpy as np
import pytest

from rr_tf.utils.png import (ADVANCE, FONT, GLYPH_H, PALETTE, draw_text, encode_png, line_plot,
                             text_mask)

SERIES = {"scratch": [0.3, 0.45, 0.6], "reprec": [0.35, np.nan, 0.7], "simclr": [0.32, 0.5, 0.62]}


def _blank(h=40, w=120):
    return np.full((h, w, 3), 255, np.uint8)


def _ink(img):
    return np.any(img != 255, axis=-1)


def _dark(img):
    return np.all(img < 100, axis=-1)


def _find(img, text, rotate=False):
    """(row, col) positions where ``text``, drawn in black, appears exactly."""
    mask = text_mask(text)
    mask = np.rot90(mask) if rotate else mask
    win = np.lib.stride_tricks.sliding_window_view(_dark(img), mask.shape)
    return np.argwhere(np.all(win == mask, axis=(-2, -1)))


def _axes(img):
    """Column of the y axis and row of the x axis: the longest black runs."""
    black = np.all(img == 0, axis=-1)
    return int(black.sum(0).argmax()), int(black.sum(1).argmax())


def test_encode_png_signature_ihdr_and_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (n,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, (crc,) = data[pos + 8:pos + 8 + n], struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag], pos = body, pos + 12 + n
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (11, 7, 8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(7, 1 + 11 * 3)
    assert (raw[:, 0] == 0).all()
    np.testing.assert_array_equal(raw[:, 1:].reshape(7, 11, 3), rgb)


def test_font_covers_required_characters():
    required = "0123456789.-+=(),:/% ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    assert set(required) <= set(FONT)
    for c in required.replace(" ", ""):
        assert FONT[c].any(), c
    assert not FONT[" "].any()


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_draw_text_width_and_bounding_box(scale):
    img, text, x, y = _blank(60, 300), "Dice 0.25 (n=3) -1%", 7, 4
    width = draw_text(img, text, x, y, colour=(200, 10, 20), scale=scale)
    assert width == len(text) * ADVANCE * scale
    rows, cols = np.nonzero(_ink(img))
    assert rows.size > 0
    assert rows.min() >= y and rows.max() < y + GLYPH_H * scale
    assert cols.min() >= x and cols.max() < x + width
    assert {tuple(p) for p in img[_ink(img)]} == {(200, 10, 20)}


def test_unknown_character_draws_a_box_without_raising():
    img = _blank()
    assert draw_text(img, "\u263a\x00", 2, 2) == 2 * ADVANCE
    assert _ink(img).sum() > 0
    a, b = _blank(), _blank()
    draw_text(a, "\u263a", 0, 0)
    draw_text(b, "\u00e9", 0, 0)
    np.testing.assert_array_equal(a, b)  # the same box for any unknown character


def test_different_characters_render_differently():
    renders = {}
    for c in "0123456789.-+=(),:/%" + "AaBbOo0Il1":
        img = _blank(12, 8)
        draw_text(img, c, 1, 1)
        renders[c] = _ink(img).tobytes()
    assert len(set(renders.values())) == len(renders)


def test_draw_text_clips_at_the_borders():
    img = _blank(20, 30)
    for x, y in [(-7, -3), (25, 15), (-1000, 5), (5, 1000), (10 ** 6, -10 ** 6)]:
        assert draw_text(img, "88", x, y, scale=2) == 2 * ADVANCE * 2
    assert img.shape == (20, 30, 3)
    assert _ink(img)[:5, :5].any() and _ink(img)[15:, 25:].any()
    reference = _blank(20, 30)
    draw_text(reference, "88", 0, 0)
    draw_text(img, "88", 0, 0)  # partially-drawn text matches unclipped text where visible
    assert (_ink(img) >= _ink(reference)).all()


def test_line_plot_old_call_still_works():
    img, colours = line_plot(SERIES, [1, 2, 4], y_range=(0.0, 1.0))
    assert img.dtype == np.uint8 and img.shape == (420, 600, 3)
    assert colours == {"scratch": PALETTE[0], "reprec": PALETTE[1], "simclr": PALETTE[2]}
    img, _ = line_plot(SERIES, [1, 2, 4], (0.0, 1.0), (360, 480), 30)  # positional, uniform margin
    assert img.shape == (360, 480, 3)
    assert (img[360 - 30, 30:450] == 0).all() and (img[30:331, 30] == 0).all()


def test_line_plot_legend_and_tick_labels():
    img, colours = line_plot(SERIES, [1, 2, 4], y_range=(0.0, 1.0), x_label="labelled cases",
                             y_label="mean Dice", title="Dice vs labelled cases")
    y_axis, x_axis = _axes(img)
    plot_right = int(np.nonzero(np.all(img[x_axis] == 0, axis=-1))[0].max())
    for name, colour in colours.items():
        in_legend = np.all(img[:, plot_right + 2:] == colour, axis=-1)
        assert in_legend.any(), name
        assert len(_find(img[:, plot_right + 2:], name)) == 1, name
    assert _dark(img[:x_axis, :y_axis - 1]).any()
    for label in ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]:  # every second gridline
        (row, col), = _find(img[:, :y_axis], label)
        assert col + len(label) * ADVANCE <= y_axis
    assert len(_find(img[:, :y_axis], "0.1")) == 0
    ticks = y_axis + 1 + np.nonzero(np.all(img[x_axis + 3, y_axis + 1:] == 0, axis=-1))[0]
    assert len(ticks) == 3
    for label, tick in zip(["1", "2", "4"], ticks):
        (row, col), = _find(img[x_axis:], label)
        assert col <= tick < col + ADVANCE
    assert len(_find(img[x_axis:], "labelled cases")) == 1
    assert len(_find(img[:, :y_axis], "mean Dice", rotate=True)) == 1
    top = int(np.nonzero(np.all(img[:, y_axis] == 0, axis=-1))[0].min())
    assert _ink(img[:top - 4, y_axis + 1:plot_right]).any()  # the (scale-2) title


def test_line_plot_without_legend_keeps_series_colours_inside_the_plot():
    img, colours = line_plot(SERIES, [1, 2, 4], legend=False)
    _, x_axis = _axes(img)
    plot_right = int(np.nonzero(np.all(img[x_axis] == 0, axis=-1))[0].max())
    for colour in colours.values():
        assert not np.all(img[:, plot_right + 1:] == colour, axis=-1).any()
        assert np.all(img[:, :plot_right] == colour, axis=-1).any()


def test_line_plot_tolerates_odd_inputs():
    img, colours = line_plot({"all nan": [np.nan, np.nan], "x" * 80: [2.0, -1.0]}, [0.5, 1e3],
                             y_range=(0.5, 0.5), size=(120, 200), title="a much too long title " * 5)
    assert img.shape == (120, 200, 3) and len(colours) == 2
    img, colours = line_plot({}, [], margin=(10, 10, 10, 10))
    assert img.shape == (420, 600, 3) and colours == {}
