"""Image bytes and decoding: every bad kind is a BadInputError naming the file; odd valid kinds become RGB."""
import io
import multiprocessing
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from blitext.data import images as images_module
from blitext.data.images import decode_image, load_image, read_image_bytes
from blitext.errors import BadInputError


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(size=(128, 128)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height; the pixel data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def pixel(image: Image.Image, xy=(0, 0)) -> tuple:
    assert image.mode == "RGB"
    return image.getpixel(xy)


# ---------------------------------------------------------------- bad inputs

def test_empty_file():
    with pytest.raises(BadInputError, match=r"^photos/empty\.jpg: empty file \(0 bytes\)"):
        decode_image(b"", "photos/empty.jpg")


def test_text_file_named_jpg():
    with pytest.raises(BadInputError, match=r"^notes\.jpg: not an image"):
        decode_image(b"just some words, not a JPEG\n", "notes.jpg")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    data = encode(noise(), fmt)
    with pytest.raises(BadInputError, match=rf"^cut\.{fmt.lower()}: truncated or corrupt image"):
        decode_image(data[: len(data) // 2], f"cut.{fmt.lower()}")


def test_corrupt_header():
    data = bytearray(encode(noise((8, 8)), "PNG"))
    data[20:24] = b"\xff\xff\xff\xff"  # inside IHDR: the CRC no longer matches
    with pytest.raises(BadInputError, match=r"^bad\.png: "):
        decode_image(bytes(data), "bad.png")


def test_bomb_over_a_small_limit_is_refused_before_decoding():
    with pytest.raises(BadInputError, match=r"^big\.png: decompression bomb refused: 64x64 = 4,096 pixels"):
        decode_image(encode(noise((64, 64)), "PNG"), "big.png", max_pixels=4095)
    assert decode_image(encode(noise((64, 64)), "PNG"), "big.png", max_pixels=4096).size == (64, 64)


# PIL itself warns (DecompressionBombWarning) on sizes over its default limit before we refuse them.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 30_000])  # over our limit only; over PIL's own open() limit too
def test_png_whose_header_claims_a_huge_size_is_refused(side):
    with pytest.raises(BadInputError, match=r"^bomb\.png: decompression bomb refused"):
        decode_image(png_claiming(side, side), "bomb.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pil_globals_are_left_alone():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(BadInputError):
        decode_image(png_claiming(12_000, 12_000), "bomb.png")
    with pytest.raises(BadInputError):
        decode_image(encode(noise((8, 8)), "PNG"), "small.png", max_pixels=10)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# ---------------------------------------------------------------- odd but valid images

def test_rgb_is_loaded_and_detached():
    image = decode_image(encode(Image.new("RGB", (3, 2), (10, 20, 30)), "PNG"), "a.png")
    assert image.size == (3, 2) and pixel(image) == (10, 20, 30)


def test_greyscale_and_bilevel_keep_their_values():
    assert pixel(decode_image(encode(Image.new("L", (4, 4), 77), "PNG"), "l.png")) == (77, 77, 77)
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((1, 0), 1)
    image = decode_image(encode(bilevel, "PNG"), "b.png")
    assert pixel(image, (0, 0)) == (0, 0, 0) and pixel(image, (1, 0)) == (255, 255, 255)


def test_16bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(values), "PNG"), "deep.png")
    assert [pixel(image, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_32bit_integer_and_float_images():
    wide = np.array([[-100, 0, 100_000]], dtype=np.int32)  # outside 16 bits: stretched to 0..255
    image = decode_image(encode(Image.fromarray(wide), "TIFF"), "wide.tif")
    assert [pixel(image, (x, 0))[0] for x in range(3)] == [0, 0, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = decode_image(encode(Image.fromarray(floats), "TIFF"), "float.tif")
    assert [pixel(image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    image = decode_image(encode(rgba, "PNG"), "rgba.png")
    assert pixel(image, (0, 0)) == (255, 0, 0) and pixel(image, (1, 0)) == (255, 255, 255)
    half = decode_image(encode(Image.new("LA", (1, 1), (0, 128)), "PNG"), "la.png")
    assert pixel(half) == (127, 127, 127)


def test_palette_with_a_transparent_index_is_white_there():
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    data = encode(palette_image, "PNG", transparency=0)
    image = decode_image(data, "pal.png")
    assert pixel(image, (0, 0)) == (255, 255, 255) and pixel(image, (1, 0)) == (0, 0, 255)
    gif = decode_image(encode(palette_image, "GIF", transparency=0), "pal.gif")
    assert pixel(gif, (0, 0)) == (255, 255, 255) and pixel(gif, (1, 0)) == (0, 0, 255)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no black, full magenta + yellow = red
    image = decode_image(encode(cmyk, "JPEG", quality=95), "print.jpg")
    assert np.abs(np.array(pixel(image, (8, 8))) - (255, 0, 0)).max() <= 8


def animation_frames():
    return [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_its_first_frame(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no animated WebP")
    first, second = animation_frames()
    data = encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0,
                  **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert pixel(decode_image(data, f"anim.{fmt.lower()}")) == (255, 0, 0)


# ---------------------------------------------------------------- files and tar members

def make_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_plain_file_and_missing_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encode(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG"))
    assert pixel(load_image(tmp_path, "images/a.png")) == (1, 2, 3)
    with pytest.raises(BadInputError, match=r"^images/b\.png: missing file"):
        read_image_bytes(tmp_path, "images/b.png")
    with pytest.raises(BadInputError, match=r"^\.\./a\.png: image reference must be relative"):
        read_image_bytes(tmp_path / "images", "../a.png")


def test_tar_members_missing_members_and_missing_shards(tmp_path):
    red = encode(Image.new("RGB", (2, 2), (200, 0, 0)), "PNG")
    make_tar(tmp_path / "s-0.tar", {"000.png": red, "000.txt": b"red", "001.jpg": b"not really"})
    assert read_image_bytes(tmp_path, "s-0.tar#000.png") == red
    assert pixel(load_image(tmp_path, "s-0.tar#000.png")) == (200, 0, 0)
    assert (os.getpid(), str(tmp_path / "s-0.tar")) in images_module._TAR_CACHE  # handle kept open
    with pytest.raises(BadInputError, match=r"^s-0\.tar#009\.png: missing member '009\.png'"):
        read_image_bytes(tmp_path, "s-0.tar#009.png")
    with pytest.raises(BadInputError, match=r"^s-1\.tar#000\.png: missing file"):
        read_image_bytes(tmp_path, "s-1.tar#000.png")
    with pytest.raises(BadInputError, match=r"^s-0\.tar#001\.jpg: not an image"):
        load_image(tmp_path, "s-0.tar#001.jpg")
    images_module.close_tar_cache()


def _read_in_child(root, ref, queue):
    queue.put(read_image_bytes(root, ref))


def test_forked_worker_opens_its_own_tar_handle(tmp_path):
    make_tar(tmp_path / "s.tar", {"a.png": b"AAAA", "b.png": b"BBBB"})
    assert read_image_bytes(tmp_path, "s.tar#a.png") == b"AAAA"  # the parent caches a handle, then forks
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(tmp_path, "s.tar#b.png", queue))
    child.start()
    assert queue.get(timeout=20) == b"BBBB"
    child.join(timeout=20)
    assert child.exitcode == 0
    assert read_image_bytes(tmp_path, "s.tar#a.png") == b"AAAA"  # the parent's handle still reads right
    images_module.close_tar_cache()
