"""ftz_edge.preprocess: parity with transformers' processors, image loading, spec round trips."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from ftz_edge.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    ImageProcessorSpec,
    clip_spec,
    dinov2_spec,
    load_image,
    preprocess,
    preprocess_batch,
)

# Portrait, landscape, smaller than the crop, square, extreme and odd aspect ratios.
SIZES = [(480, 640), (640, 480), (100, 150), (336, 336), (1000, 37), (37, 999), (257, 255)]

DINOV2_CONFIG = {  # facebook/dinov2-base preprocessor_config.json, verbatim
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def _random_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8))


def _hf_pixels(processor, image) -> np.ndarray:
    return processor(image, return_tensors="np")["pixel_values"][0]


@pytest.fixture(scope="module")
def hf():
    # The reference is transformers' PIL backend: it is what CLIPImageProcessor resolves to
    # without torchvision (as here); the torchvision backend resizes slightly differently.
    import transformers
    return transformers


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("image_size", [336, 224])
def test_clip_parity_through_saved_config(hf, tmp_path, image_size):
    proc = hf.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
    proc.save_pretrained(tmp_path)
    spec = ImageProcessorSpec.from_pretrained_folder(tmp_path)
    assert spec == clip_spec(image_size)
    for i, (h, w) in enumerate(SIZES):
        image = _random_image(h, w, seed=i)
        ours, ref = preprocess(image, spec), _hf_pixels(proc, image)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, image_size, image_size)
        assert np.abs(ours - ref).max() <= 1e-5, (h, w)


def test_dinov2_parity_through_auto_processor(hf, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(DINOV2_CONFIG))
    proc = hf.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(proc).__name__ == "BitImageProcessorPil"
    spec = ImageProcessorSpec.from_pretrained_folder(tmp_path)
    assert spec == dinov2_spec()
    images = [_random_image(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    batch = preprocess_batch(images, spec)
    assert batch.shape == (len(SIZES), 3, 224, 224) and batch.dtype == np.float32
    for image, ours in zip(images, batch):
        assert np.abs(ours - _hf_pixels(proc, image)).max() <= 1e-5


@pytest.mark.parametrize("kwargs", [
    # direct resize smaller than the crop: exercises the zero padding (even and odd amounts)
    dict(size={"height": 200, "width": 181}, crop_size={"height": 224, "width": 224}),
    dict(size={"height": 300, "width": 181}, crop_size={"height": 224, "width": 224},
         resample=2, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    dict(size={"height": 240, "width": 320}, do_center_crop=False),
    dict(size={"shortest_edge": 230}, crop_size={"height": 200, "width": 210}, resample=2),
])
def test_parity_other_configs(hf, tmp_path, kwargs):
    proc = hf.CLIPImageProcessorPil(**kwargs)
    proc.save_pretrained(tmp_path)
    spec = ImageProcessorSpec.from_pretrained_folder(tmp_path)
    for i, (h, w) in enumerate(SIZES[:4]):
        image = _random_image(h, w, seed=20 + i)
        ours, ref = preprocess(image, spec), _hf_pixels(proc, image)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-5


def test_padding_values_are_normalized_zero():
    spec = ImageProcessorSpec.from_processor_config(
        {"size": {"height": 200, "width": 200}, "crop_size": 224})
    out = preprocess(_random_image(50, 50), spec)
    expected = -np.asarray(CLIP_MEAN, np.float32) / np.asarray(CLIP_STD, np.float32)
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)  # padded corner
    np.testing.assert_allclose(out[:, -1, -1], expected, rtol=1e-6)
    assert not np.allclose(out[:, 112, 112], expected)  # the image itself


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_parity_non_rgb_input(hf, mode):
    # transformers composites alpha over white and converts L to RGB; so must we.
    proc = hf.CLIPImageProcessorPil(size={"shortest_edge": 224},
                                    crop_size={"height": 224, "width": 224})
    image = _random_image(300, 250, seed=3, mode=mode)
    assert np.abs(preprocess(image, clip_spec(224)) - _hf_pixels(proc, image)).max() <= 1e-5


def test_sources_agree(tmp_path):
    image = _random_image(120, 90, seed=5)
    path = tmp_path / "x.png"
    image.save(path)
    spec = clip_spec(64)
    ref = preprocess(image, spec)
    for source in (path, str(path), path.read_bytes(), np.asarray(image)):
        np.testing.assert_array_equal(preprocess(source, spec), ref)


def test_batch_of_different_sizes_without_crop_is_refused():
    spec = ImageProcessorSpec.from_processor_config({"size": {"shortest_edge": 32},
                                                     "do_center_crop": False})
    with pytest.raises(ValueError, match="different sizes"):
        preprocess_batch([_random_image(40, 60), _random_image(60, 40)], spec)


# ----------------------------------------------------------------------------------- loading


def _png_roundtrip(image: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save_kwargs)
    return buf.getvalue()


def test_odd_modes_load_as_sensible_rgb():
    h, w = 6, 8

    def px(img):
        out = load_image(img)
        assert out.mode == "RGB" and out.size == (w, h)
        return np.asarray(out)

    gray16 = Image.fromarray(np.full((h, w), 32768, np.uint16))
    assert gray16.mode == "I;16"
    assert (px(gray16) == 128).all()  # mid-gray, not clipped to white
    assert (px(Image.open(io.BytesIO(_png_roundtrip(gray16)))) == 128).all()  # 16-bit PNG

    ramp = np.linspace(0, 65535, h * w).reshape(h, w)
    i32 = Image.fromarray(ramp.astype(np.int32))
    assert i32.mode == "I"
    got = px(i32)[..., 0]
    np.testing.assert_array_equal(got, np.rint(ramp.astype(np.int32) / 257.0))
    assert px(Image.fromarray(np.full((h, w), 200, np.int32)))[0, 0, 0] == 200  # 8-bit data in I

    assert (px(Image.fromarray(np.full((h, w), 0.5, np.float32))) == 128).all()  # F in [0, 1]
    signed = Image.fromarray(np.linspace(-1, 1, h * w, dtype=np.float32).reshape(h, w))
    got = px(signed)
    assert got.min() == 0 and got.max() == 255  # unknown range: stretched, not clipped

    assert (px(Image.new("L", (w, h), 77)) == 77).all()

    la = np.zeros((h, w, 2), np.uint8)
    la[:, w // 2:, 1] = 255  # left transparent black, right opaque black
    got = px(Image.fromarray(la, "LA"))
    assert (got[:, : w // 2] == 255).all() and (got[:, w // 2:] == 0).all()

    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, : w // 2, 3] = 0
    rgba[:, w // 2:, 3] = 255
    got = px(Image.fromarray(rgba, "RGBA"))
    assert (got[:, : w // 2] == 255).all()  # transparent -> white
    assert (got[:, w // 2:] == [200, 0, 0]).all()

    pal = Image.new("P", (w, h), 0)
    pal.putpalette([10, 20, 30, 255, 0, 0] + [0, 0, 0] * 254)
    pal.paste(1, (w // 2, 0, w, h))
    assert (px(pal)[:, : w // 2] == [10, 20, 30]).all()  # plain palette
    transparent = Image.open(io.BytesIO(_png_roundtrip(pal, transparency=0)))
    assert transparent.mode == "P" and "transparency" in transparent.info
    got = px(transparent)
    assert (got[:, : w // 2] == 255).all() and (got[:, w // 2:] == [255, 0, 0]).all()

    cmyk = Image.new("CMYK", (w, h), (255, 0, 0, 0))
    assert (px(cmyk) == [0, 255, 255]).all()  # pure cyan

    bits = Image.fromarray(np.indices((h, w)).sum(0) % 2 == 0)
    assert bits.mode == "1"
    got = px(bits)
    assert set(np.unique(got)) == {0, 255} and got[0, 0, 0] == 255 and got[0, 1, 0] == 0


def test_exif_orientation_applied(tmp_path):
    image = _random_image(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    _random_image(200, 300, seed=1).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name, data", [
    ("cut.jpg", _encoded("JPEG")[: len(_encoded("JPEG")) // 2]),
    ("tail.jpg", _encoded("JPEG")[:-20]),
    ("cut.png", _encoded("PNG")[: len(_encoded("PNG")) // 2]),
    ("tail.png", _encoded("PNG")[:-20]),  # decodes fully, but the last IDAT chunk is cut
    ("notes.png", b"this is a text file, not an image\n"),
    ("empty.jpg", b""),
])
def test_bad_files_raise_naming_the_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=name):
        load_image(path)
    with pytest.raises(ImageLoadError):
        preprocess(str(path), clip_spec(224))


def test_missing_file_raises_naming_the_file(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(path)
    assert issubclass(ImageLoadError, ValueError)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be huge: IHDR plus an (empty) IDAT, no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


def test_oversized_images_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(9000, 8000))  # 72 MP: over our default 64 MP
    with pytest.raises(ImageLoadError, match="bomb.png.*max_pixels"):
        load_image(path)
    path.write_bytes(_png_header_only(20000, 20000))  # over Pillow's own hard limit as well
    with pytest.raises(ImageLoadError, match="bomb.png"):
        load_image(path, max_pixels=None)
    with pytest.raises(ImageLoadError, match="max_pixels=100"):
        load_image(_random_image(20, 20), max_pixels=100)


# -------------------------------------------------------------------------------------- spec


def test_spec_dict_round_trip():
    for spec in (clip_spec(336), dinov2_spec(), ImageProcessorSpec(
            0, 200, 210, "bilinear", False, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 240, 320)):
        d = json.loads(json.dumps(spec.to_dict()))
        assert ImageProcessorSpec.from_dict(d) == spec
        assert isinstance(ImageProcessorSpec.from_dict(d).image_mean, tuple)
    assert clip_spec(336).to_dict()["image_mean"] == list(CLIP_MEAN)
    with pytest.raises(ValueError, match="unknown"):
        ImageProcessorSpec.from_dict({**clip_spec(224).to_dict(), "interpolation": "bicubic"})


def test_processor_config_forms():
    spec = ImageProcessorSpec.from_processor_config({"size": 256, "crop_size": 224})
    assert (spec.resize_shortest_edge, spec.crop_height, spec.crop_width) == (256, 224, 224)
    spec = ImageProcessorSpec.from_processor_config(
        {"size": {"height": 240, "width": 320}, "crop_size": {"height": 200, "width": 210}})
    assert (spec.resize_shortest_edge, spec.resize_height, spec.resize_width) == (0, 240, 320)
    assert (spec.crop_height, spec.crop_width) == (200, 210)
    spec = ImageProcessorSpec.from_processor_config(
        {"size": 64, "crop_size": 64, "do_normalize": False, "do_rescale": False})
    assert spec.image_mean == (0, 0, 0) and spec.image_std == (1, 1, 1)
    assert spec.rescale_factor == 1.0
    assert preprocess(Image.new("RGB", (64, 64), (3, 4, 5)), spec)[:, 0, 0].tolist() == [3, 4, 5]


@pytest.mark.parametrize("cfg, message", [
    ({"size": 224, "crop_size": 224, "resample": 1}, "resample"),  # LANCZOS
    ({"size": 224, "crop_size": 224, "resample": 0}, "resample"),  # NEAREST
    ({"size": {"shortest_edge": 224, "longest_edge": 448}, "crop_size": 224}, "size"),
    ({"size": 224, "crop_size": 224, "image_processor_type": "SiglipImageProcessor"}, "Siglip"),
    ({"size": 224, "crop_size": 224, "do_resize": False}, "do_resize"),
])
def test_processor_config_rejects(cfg, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessorSpec.from_processor_config(cfg)


def test_pretrained_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessorSpec.from_pretrained_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessorSpec.from_pretrained_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**DINOV2_CONFIG, "resample": 5}))
    with pytest.raises(ValueError, match="preprocessor_config.json.*resample"):
        ImageProcessorSpec.from_pretrained_folder(tmp_path)


def test_module_is_torch_free():
    code = ("import sys, ftz_edge.preprocess; "
            "bad = {'torch', 'transformers', 'torchvision'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_writes_a_processor_config_that_reads_back(tmp_path):
    from ftz_edge.preprocess import clip_spec, dinov2_spec

    for spec in (clip_spec(336), dinov2_spec(224, 256)):
        assert ImageProcessorSpec.from_processor_config(spec.to_processor_config()) == spec
