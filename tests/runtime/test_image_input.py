"""Input images as users give them: every kind reaches the requested size through `sdrun img2img`; the
conversions (EXIF orientation, transparency, 16-bit levels) and each resize mode's geometry without the model;
unreadable files refused with exit 2 and no PNG."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdrun.errors import USAGE_EXIT_CODE, UserError
from sdrun.image_input import (BACKGROUND, ResizeMode, cover_box, fit_pixels, fit_size, load_image, pad_edges,
                               read_pixels)
from tests.runtime.test_generate import sdrun

ORIENTATION = 0x0112  # EXIF tag; 6: the stored image is shown turned 90° clockwise


def gradient(width: int, height: int, channels: int = 3) -> np.ndarray:
    """(height, width, channels) uint8 with a different level almost everywhere."""
    rows, cols = np.mgrid[:height, :width]
    planes = [(rows * 255 // max(height - 1, 1)), (cols * 255 // max(width - 1, 1)), (rows + cols) % 256]
    return np.stack((planes * 2)[:channels], axis=-1).astype(np.uint8)


def photo_with_orientation_6(path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(gradient(300, 200)).save(path, format="JPEG", exif=exif)  # stored 300×200, shown 200×300


def rgba_256(path):
    pixels = gradient(256, 256, 4)
    pixels[:128, :, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)


def grayscale(path):
    Image.fromarray(gradient(100, 70, 1)[..., 0], "L").save(path)


def palette_with_transparency(path):
    image = Image.fromarray(gradient(50, 80)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(path, transparency=0)


def cmyk_jpeg(path):
    Image.fromarray(gradient(120, 90, 4), "CMYK").save(path, format="JPEG")


def sixteen_bit_png(path):
    Image.fromarray((gradient(64, 40, 1)[..., 0].astype(np.uint16) * 257)).save(path)


# (writer, file name, extra options, output (width, height))
KINDS = {
    "rgb-exif-6-photo": (photo_with_orientation_6, "photo.jpg", (), (64, 64)),  # no size: the recipe's default
    "rgba-256": (rgba_256, "rgba.png", ("--width", 96, "--height", 64, "--resize-mode", "crop"), (96, 64)),
    "grayscale": (grayscale, "gray.png", ("--width", 32, "--height", 128, "--resize-mode", "fill"), (32, 128)),
    "palette-transparent": (palette_with_transparency, "p.png", ("--width", 128), (128, 64)),
    "cmyk-jpeg": (cmyk_jpeg, "cmyk.jpg", ("--height", 48, "--width", 48), (48, 48)),
    "16-bit-png": (sixteen_bit_png, "wide.png", ("--resize-mode", "crop"), (64, 64)),
}


def img2img(bundle, image, out, *extra):
    return ["img2img", "--bundle", bundle, "--image", image, "--prompt", "x", "--steps", 2, "--strength", 0.5,
            "--quiet", "--backend", "onnxruntime", "--out", out, *extra]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_image_comes_out_at_the_requested_size(kind, tiny_bundle, tmp_path, capsys):
    write, name, extra, size = KINDS[kind]
    write(tmp_path / name)
    code, err = sdrun(capsys, *img2img(tiny_bundle, tmp_path / name, tmp_path / "out.png", *extra))
    assert code == 0, err
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == size and out.mode == "RGB"


def test_exif_orientation_6_turns_the_stored_image_clockwise(tmp_path):
    stored = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 tall
    stored[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    shown = read_pixels(tmp_path / "turned.png")
    assert shown.shape == (4, 2, 3)
    assert tuple(shown[0, 1]) == (255, 0, 0)  # stored top-left is shown top-right
    assert shown.sum() == 255


def test_16_bit_levels_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 257, 32768, 65535]], np.uint16)).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    assert read_pixels(tmp_path / "wide.png")[0, :, 0].tolist() == [0, 1, 128, 255]
    assert read_pixels(tmp_path / "wide.png", mode="L").tolist() == [[0, 1, 128, 255]]


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = read_pixels(tmp_path / "rgba.png")
    assert tuple(pixels[0, 0]) == BACKGROUND and tuple(pixels[0, 1]) == (0, 0, 255)
    assert np.all(np.abs(pixels[0, 2].astype(int) - 127) <= 1)
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.save(tmp_path / "p.png", transparency=0)
    assert read_pixels(tmp_path / "p.png").tolist() == [[list(BACKGROUND), [40, 50, 60]]]


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg")
    red = read_pixels(tmp_path / "red.jpg").astype(int)
    assert red.shape == (8, 8, 3) and np.all(np.abs(red - (255, 0, 0)) <= 8)


def test_resize_geometry():
    assert cover_box(40, 20, 20, 20) == (10.0, 0.0, 30.0, 20.0)  # wide source: the middle square
    assert cover_box(20, 40, 40, 20) == (0.0, 15.0, 20.0, 25.0)  # tall source, wide target
    assert fit_size(40, 20, 20, 20) == (20, 10) and fit_size(20, 40, 40, 20) == (10, 20)
    assert pad_edges(np.array([[1, 2], [3, 4]]), 4, 4).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2],
                                                                   [3, 3, 4, 4], [3, 3, 4, 4]]


def test_each_resize_mode_on_a_striped_image():
    stripes = np.zeros((20, 40), np.uint8)  # 40 wide: columns 0-9 at 0, 10-29 at 200, 30-39 at 50
    stripes[:, 10:30], stripes[:, 30:] = 200, 50
    cropped = fit_pixels(stripes, 20, 20, ResizeMode.CROP)
    assert cropped.shape == (20, 20) and np.all(cropped == 200)  # the middle 20 columns only
    stretched = fit_pixels(stripes, 20, 20, "just-resize")
    assert stretched.shape == (20, 20) and stretched[:, 0].max() < 20 and abs(int(stretched[:, -1].min()) - 50) < 20
    filled = fit_pixels(stripes, 20, 20, ResizeMode.FILL)
    assert filled.shape == (20, 20)
    assert np.array_equal(filled[:5], np.repeat(filled[5:6], 5, 0))  # top band: the image's first row
    assert np.array_equal(filled[15:], np.repeat(filled[14:15], 5, 0))
    assert filled[10, 0] < 20 and abs(int(filled[10, -1]) - 50) < 20
    assert fit_pixels(stripes, 40, 20, ResizeMode.FILL) is stripes  # already at the size


def test_a_mask_loads_as_one_channel_at_the_size(tmp_path):
    Image.fromarray(gradient(30, 10)).save(tmp_path / "mask.png")
    assert load_image(tmp_path / "mask.png", 16, 8, mode="L").shape == (8, 16)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height RGB pixels over a few bytes of data (nothing is allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def noise_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)  # ~12 kB


def truncated_png(path):
    noise_png(path)
    path.write_bytes(path.read_bytes()[:4000])


def corrupt_png(path):
    noise_png(path)
    data = bytearray(path.read_bytes())
    data[2000:2100] = bytes(100)  # inside the compressed pixels
    path.write_bytes(bytes(data))


BAD_FILES = {
    "missing": (lambda path: None, "does not exist"),
    "not-an-image": (lambda path: path.write_text("name,value\n"), "cannot read"),
    "truncated": (truncated_png, "cannot read"),
    "corrupt": (corrupt_png, "cannot read"),
    "decompression-bomb": (lambda path: path.write_bytes(png_claiming(30000, 30000)), "too large to read safely"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_unreadable_files_are_user_errors(kind, tmp_path):
    write, message = BAD_FILES[kind]
    write(tmp_path / "in.png")
    with pytest.raises(UserError, match=message):
        load_image(tmp_path / "in.png", 64, 64)


@pytest.mark.parametrize("kind", ["truncated", "decompression-bomb"])
def test_unreadable_files_exit_2_with_no_png(kind, tiny_bundle, tmp_path, capsys):
    write, message = BAD_FILES[kind]
    write(tmp_path / "in.png")
    code, err = sdrun(capsys, *img2img(tiny_bundle, tmp_path / "in.png", tmp_path / "out.png"))
    assert code == USAGE_EXIT_CODE and message in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()
