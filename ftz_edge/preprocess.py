"""The project's single image preprocessing: decode -> RGB -> resize -> center crop -> normalize.

Training, export calibration and the on-device runtime all call this module, so it imports only
the stdlib, numpy and Pillow (never torch / transformers / torchvision) and runs on Python 3.10.

The numbers reproduce transformers' *PIL backend* (``CLIPImageProcessorPil``,
``BitImageProcessorPil``; transformers 5.x falls back to these when torchvision is missing)
bit for bit:

* resize: ``PIL.Image.resize`` on the uint8 RGB image (``reducing_gap=None``); for
  ``shortest_edge`` the long side is ``int(edge * long / short)`` (truncation, not rounding);
* center crop: offset ``(size - crop) // 2``; a side smaller than the crop is zero-padded
  (on the uint8 image, before normalizing) with ``ceil(pad / 2)`` in front;
* rescale: ``uint8 -> float64 * factor -> float32``, then normalize in float32:
  ``(x - float32(mean)) / float32(std)``.

transformers' torchvision backend (the default when torchvision *is* installed) resizes with
``torchvision.transforms.v2.functional.resize`` instead, which is close to PIL but not identical
(individual pixels may differ by a uint8 step), and pads undersized crops with ``floor`` in front.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_MAX_PIXELS",
    "ImageLoadError", "ImageProcessorSpec", "clip_spec", "dinov2_spec",
    "load_image", "preprocess", "preprocess_batch", "encoder_pixels", "ANCHOR_INPUT", "AUGMENTER_INPUT",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Refuse anything bigger before decoding it (an 8K photo is 33 MP). Pillow's own
# Image.MAX_IMAGE_PIXELS limit (a warning above ~89 MP, an error above ~179 MP) still applies too.
DEFAULT_MAX_PIXELS = 64_000_000

_PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_RESAMPLE_FROM_INT = {2: "bilinear", 3: "bicubic"}  # PILImageResampling values in HF configs
# Processor classes whose config semantics (bare-int size = shortest edge, center crop on by
# default, CLIP mean/std and bicubic as class defaults) are what from_processor_config assumes.
_KNOWN_PROCESSORS = {
    "CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast", "CLIPFeatureExtractor",
    "BitImageProcessor", "BitImageProcessorPil", "BitImageProcessorFast",
}

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]


class ImageLoadError(ValueError):
    """An image could not be read or decoded; the message names the file."""


@dataclass(frozen=True)
class ImageProcessorSpec:
    """Everything needed to turn an image into pixel values; JSON-friendly for manifests.

    Resize is either "shortest edge" (``resize_shortest_edge > 0``, aspect kept) or direct to
    ``resize_height x resize_width`` (then ``resize_shortest_edge`` is 0 and aspect is not kept).
    """

    resize_shortest_edge: int
    crop_height: int
    crop_width: int
    resample: str = "bicubic"
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    image_mean: Tuple[float, float, float] = CLIP_MEAN
    image_std: Tuple[float, float, float] = CLIP_STD
    resize_height: Optional[int] = None
    resize_width: Optional[int] = None

    def __post_init__(self) -> None:
        # Coerce lists from JSON into tuples so specs stay hashable and compare equal.
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {value}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")
        if self.resample not in _PIL_RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_PIL_RESAMPLE)}, "
                             f"got {self.resample!r}")
        direct = (self.resize_height, self.resize_width)
        if (direct[0] is None) != (direct[1] is None):
            raise ValueError("resize_height and resize_width must be given together")
        if direct[0] is not None:
            if self.resize_shortest_edge != 0 or min(direct) <= 0:
                raise ValueError("a direct resize needs positive resize_height/resize_width "
                                 "and resize_shortest_edge=0")
        elif self.resize_shortest_edge <= 0:
            raise ValueError(f"resize_shortest_edge must be positive, "
                             f"got {self.resize_shortest_edge}")
        if self.crop_height <= 0 or self.crop_width <= 0:
            raise ValueError(f"crop size must be positive, "
                             f"got {self.crop_height}x{self.crop_width}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ImageProcessorSpec":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:  # a manifest from another version: fail loudly rather than drop settings
            raise ValueError(f"unknown ImageProcessorSpec fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_processor_config(cls, cfg: Dict[str, Any]) -> "ImageProcessorSpec":
        """Read a Hugging Face ``preprocessor_config.json`` (CLIP or BiT/DINOv2 processor)."""
        kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
        if kind is not None and kind not in _KNOWN_PROCESSORS:
            raise ValueError(f"unsupported image processor {kind!r}; only CLIP/BiT-style configs "
                             f"({', '.join(sorted(_KNOWN_PROCESSORS))}) are understood")
        if cfg.get("do_resize", True) is False:
            raise ValueError("do_resize=false is not supported: the model needs a fixed input size")

        shortest, height, width = 0, None, None
        size = cfg.get("size", {"shortest_edge": 224})  # class default of CLIP and BiT
        if isinstance(size, int):
            # CLIP/BiT have default_to_square=False, so a bare int is the shortest edge.
            if cfg.get("default_to_square", False):
                height = width = size
            else:
                shortest = size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            height, width = int(size[0]), int(size[1])
        elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict) and set(size) == {"height", "width"}:
            height, width = int(size["height"]), int(size["width"])
        else:
            raise ValueError(f"unsupported 'size' {size!r}: expected an int, "
                             "{'shortest_edge': n} or {'height': h, 'width': w}")

        do_center_crop = bool(cfg.get("do_center_crop", True))
        crop = cfg.get("crop_size")
        if isinstance(crop, int):
            crop_h = crop_w = crop
        elif isinstance(crop, (list, tuple)) and len(crop) == 2:
            crop_h, crop_w = int(crop[0]), int(crop[1])
        elif isinstance(crop, dict) and set(crop) == {"height", "width"}:
            crop_h, crop_w = int(crop["height"]), int(crop["width"])
        elif crop is None and not do_center_crop:
            # Unused for the pixels; record the resize target as the nominal output size.
            crop_h, crop_w = (height, width) if height else (shortest, shortest)
        else:
            raise ValueError(f"unsupported 'crop_size' {crop!r}: expected an int or "
                             "{'height': h, 'width': w}")

        resample = cfg.get("resample", 3)  # class default of CLIP and BiT is BICUBIC
        if isinstance(resample, str) and resample.lower() in _PIL_RESAMPLE:
            resample = resample.lower()
        elif type(resample) is int and resample in _RESAMPLE_FROM_INT:
            resample = _RESAMPLE_FROM_INT[resample]
        else:
            raise ValueError(f"unsupported 'resample' {resample!r}: only 2 (bilinear) and "
                             "3 (bicubic) are supported")

        # do_rescale/do_normalize=false are exact identities in float32 with these values.
        factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        if cfg.get("do_normalize", True):
            mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else mean
        std = (std,) * 3 if isinstance(std, (int, float)) else std

        return cls(resize_shortest_edge=shortest, crop_height=crop_h, crop_width=crop_w,
                   resample=resample, do_center_crop=do_center_crop, rescale_factor=factor,
                   image_mean=tuple(mean), image_std=tuple(std),
                   resize_height=height, resize_width=width)

    def to_processor_config(self) -> Dict[str, Any]:
        """A ``preprocessor_config.json`` (CLIPImageProcessor form) that reads back to this spec,
        so saved encoder folders carry their preprocessing for transformers and for us."""
        if self.resize_height is not None:
            size: Dict[str, int] = {"height": self.resize_height, "width": self.resize_width}
        else:
            size = {"shortest_edge": self.resize_shortest_edge}
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True, "size": size,
            "resample": next(k for k, v in _RESAMPLE_FROM_INT.items() if v == self.resample),
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "do_rescale": True, "rescale_factor": self.rescale_factor,
            "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    @classmethod
    def from_pretrained_folder(cls, path: Union[str, "os.PathLike[str]"]) -> "ImageProcessorSpec":
        file = os.path.join(os.fspath(path), "preprocessor_config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no preprocessor config: '{file}' does not exist")
        try:
            with open(file, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read preprocessor config '{file}': {e}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"malformed preprocessor config '{file}': expected a JSON object")
        try:
            return cls.from_processor_config(cfg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed preprocessor config '{file}': {e}") from e


def clip_spec(image_size: int = 224) -> ImageProcessorSpec:
    """OpenAI CLIP: shortest edge = crop = image_size, bicubic, CLIP mean/std."""
    return ImageProcessorSpec(image_size, image_size, image_size, "bicubic", True, 1 / 255,
                              CLIP_MEAN, CLIP_STD)


def dinov2_spec(crop_size: int = 224, resize: int = 256) -> ImageProcessorSpec:
    """facebook/dinov2-*: shortest edge 256, center crop 224, bicubic, ImageNet mean/std."""
    return ImageProcessorSpec(resize, crop_size, crop_size, "bicubic", True, 1 / 255,
                              IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------------- loading


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16* / I / F -> 8-bit L. Pillow's own convert clips at 255, turning 16-bit photos white."""
    a = np.asarray(img).astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        a = a / 257.0  # fixed 16-bit range: 65535 -> 255, independent of the content
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif lo >= 0.0 and hi <= 255.0:
        pass  # already an 8-bit range (e.g. an I image made from 8-bit data)
    elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0  # 16-bit data in a 32-bit container (how some decoders give 16-bit PNG/TIFF)
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))  # unknown range: stretch min..max
    else:
        a = np.full_like(a, 255.0 if hi > 0 else 0.0)  # constant and out of range
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _high_depth_to_l(img)
    # Transparency is composited over white, like transformers' convert_to_rgb (and most VLM
    # stacks): dropping alpha instead would expose whatever colour hides under transparent pixels.
    if "A" in img.getbands() or "a" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    return f"<in-memory {type(source).__name__}>"


def _check_size(img: Image.Image, name: str, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageLoadError(f"cannot read image {name}: {img.width}x{img.height} is more than "
                             f"max_pixels={max_pixels} (possible decompression bomb)")


def _decode(data: bytes, name: str, max_pixels: Optional[int]) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: size check before decoding
        _check_size(img, name, max_pixels)
        if img.format == "PNG":
            # A PNG cut inside its last IDAT chunk still decodes; verify() checks every chunk CRC.
            Image.open(io.BytesIO(data)).verify()
        img.load()  # Pillow decodes lazily; with LOAD_TRUNCATED_IMAGES False this raises
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"cannot read image {name}: too large ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"cannot read image {name}: not a recognised image file") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"cannot read image {name}: truncated or corrupt ({e})") from e
    return img


def load_image(source: ImageSource, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``source`` (path, encoded bytes, PIL image, or uint8 HxW / HxWx{3,4} array) as RGB.

    EXIF orientation is applied. Alpha (RGBA, LA, PA, palette transparency) is composited over
    white. 16-bit and float images are scaled to 8 bits (see ``_high_depth_to_l``) rather than
    clipped. ``max_pixels=None`` disables the size guard. Raises ``ImageLoadError``.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:  # read it all: no open file handles left behind
                data = f.read()
        except OSError as e:
            raise ImageLoadError(f"cannot read image {name}: {e.strerror or e}") from e
        img = _decode(data, name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = _decode(bytes(source), name, max_pixels)
    elif isinstance(source, Image.Image):
        img = source
        _check_size(img, name, max_pixels)
    elif isinstance(source, np.ndarray):
        shape_ok = source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))
        if source.dtype != np.uint8 or not shape_ok:
            raise ImageLoadError(f"cannot read image {name}: expected uint8 HxW or HxWx3/4 array, "
                                 f"got {source.dtype} {source.shape}")
        img = Image.fromarray(np.ascontiguousarray(source))
        _check_size(img, name, max_pixels)
    else:
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    try:
        return _to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError) as e:
        raise ImageLoadError(f"cannot read image {name}: cannot convert mode {img.mode} "
                             f"to RGB ({e})") from e


# ------------------------------------------------------------------------------ preprocessing


def _resize_size(height: int, width: int, spec: ImageProcessorSpec) -> Tuple[int, int]:
    """Output (h, w), as transformers' get_resize_output_image_size(default_to_square=False)."""
    if spec.resize_height is not None:
        return spec.resize_height, spec.resize_width
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize_shortest_edge, int(spec.resize_shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(a: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HWC center crop; a side smaller than the crop is zero-padded, ceil(pad/2) in front."""
    src, dst = [], []
    for size, crop in ((a.shape[0], crop_h), (a.shape[1], crop_w)):
        if crop <= size:
            off = (size - crop) // 2
            src.append(slice(off, off + crop))
            dst.append(slice(0, crop))
        else:
            off = math.ceil((crop - size) / 2)
            src.append(slice(0, size))
            dst.append(slice(off, off + size))
    if a.shape[0] >= crop_h and a.shape[1] >= crop_w:
        return a[src[0], src[1]]
    out = np.zeros((crop_h, crop_w) + a.shape[2:], dtype=a.dtype)
    out[dst[0], dst[1]] = a[src[0], src[1]]
    return out


def preprocess(image: ImageSource, spec: ImageProcessorSpec) -> np.ndarray:
    """One image (anything ``load_image`` accepts) -> float32 CHW pixel values."""
    img = load_image(image)
    h, w = _resize_size(img.height, img.width, spec)
    a = np.asarray(img.resize((w, h), resample=_PIL_RESAMPLE[spec.resample]))  # HWC uint8
    if spec.do_center_crop:
        a = _center_crop(a, spec.crop_height, spec.crop_width)
    # Same dtype path as transformers: float64 multiply, cast to float32, normalize in float32.
    x = (a.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    x = (x - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


ANCHOR_INPUT, AUGMENTER_INPUT = "anchor_pixels", "augmenter_pixels"


def encoder_pixels(images: Iterable[ImageSource], anchor_spec: ImageProcessorSpec,
                   augmenter_spec: Optional[ImageProcessorSpec]) -> Dict[str, np.ndarray]:
    """Images -> the vision graph's inputs by name: CLIP pixels, and DINOv2 pixels when the tower
    has an augmenter (``augmenter_spec`` given). Each image is decoded once for both encoders."""
    loaded = [load_image(image) for image in images]
    pixels = {ANCHOR_INPUT: preprocess_batch(loaded, anchor_spec)}
    if augmenter_spec is not None:
        pixels[AUGMENTER_INPUT] = preprocess_batch(loaded, augmenter_spec)
    return pixels


def preprocess_batch(images: Iterable[ImageSource], spec: ImageProcessorSpec) -> np.ndarray:
    """Several images -> float32 NCHW. All outputs must share one size (true with center crop)."""
    arrays = [preprocess(im, spec) for im in images]
    if not arrays:
        raise ValueError("preprocess_batch needs at least one image")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images preprocess to different sizes {sorted(shapes)}; "
                         "enable do_center_crop or use a height/width resize to batch them")
    return np.stack(arrays)
