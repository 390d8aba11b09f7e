"""Image augmentation for MUMC pretraining (Li et al. 2023): random resized crop, horizontal flip, RandAugment(2, 7).

Host-side numpy/PIL, driven by the per-record numpy rng that grain derives from (seed, record index), so a
resumed run draws exactly the same augmentations. `pretrain_augment(image, rng, size)` takes a uint8 image
[H, W] or [H, W, 3] and returns uint8 [size, size, 3].

What differs from timm/ALBEF's `RandomAugment(2, 7, isPIL=True, augs=[...])` (the one MUMC uses):
- the same ten operations (Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y,
  TranslateX/Y, Rotate), two drawn per image, each applied with probability 0.5 at magnitude 7/10 with a
  random sign, as ALBEF's version; but done with PIL's ImageOps/ImageEnhance/affine on the PIL image,
  not ALBEF's OpenCV re-implementation, so interpolation and border fill (128 gray) differ in detail;
- the crop uses torchvision's RandomResizedCrop rule (10 tries of scale x log-uniform ratio 3/4..4/3, then
  the centre crop) with PIL bicubic resizing.

`data.augment_at` says where the crop and flip run: "host" (MUMC's own order, all PIL: crop, flip,
RandAugment) or "device": the host draws the same crop box and flip from the same rng, in the same order,
and `pipeline.device_preprocess` crops, resizes (bicubic, antialiased as PIL) and flips in the jitted step
(`device_view_inputs` below). RandAugment's ops stay PIL ops on the host and then come before the crop, on
the whole image resized to the training size.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)


def _enhance(kind):
    return lambda img, v: kind(img).enhance(1.0 + v * 0.9)


def _affine(img, matrix):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR,
                         fillcolor=FILL)


OPS = {
    "Identity": lambda img, v: img,
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, v: _affine(img, (1, v * 0.3, 0, 0, 1, 0)),
    "ShearY": lambda img, v: _affine(img, (1, 0, 0, v * 0.3, 1, 0)),
    "TranslateX": lambda img, v: _affine(img, (1, 0, v * 0.45 * img.size[0], 0, 1, 0)),   # ALBEF: 0.45*10/10
    "TranslateY": lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * 0.45 * img.size[1])),
    "Rotate": lambda img, v: img.rotate(v * 30.0, resample=Image.Resampling.BILINEAR, fillcolor=FILL),
}


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: int = 7,
                 prob: float = 0.5) -> Image.Image:
    """`num_ops` operations drawn with replacement, each applied with `prob` at +-magnitude/10."""
    names = list(OPS)
    for i in rng.integers(0, len(names), num_ops):
        apply, sign = rng.random() < prob, (1.0 if rng.random() < 0.5 else -1.0)
        if apply:
            img = OPS[names[int(i)]](img, sign * magnitude / 10.0)
    return img


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale=(0.2, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) following torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_rgb(image: np.ndarray) -> Image.Image:
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {image.shape}")
    return Image.fromarray(image)


def pretrain_augment(image: np.ndarray, rng: np.random.Generator | None, size: int, *,
                     crop_scale=(0.2, 1.0), flip: bool = True, randaugment=(2, 7)) -> np.ndarray:
    """uint8 [H, W] | [H, W, 3] -> uint8 [size, size, 3]; rng None: plain resize (evaluation)."""
    img = to_rgb(image)
    if rng is None:
        return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
    top, left, h, w = random_resized_crop_box(rng, img.size[1], img.size[0], tuple(crop_scale))
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if randaugment:
        img = rand_augment(img, rng, int(randaugment[0]), int(randaugment[1]))
    return np.asarray(img)


AUGMENT_AT = ("host", "device")


def augment_at(data) -> str:
    """config.data.augment_at, checked: "host" (MUMC's PIL transforms) or "device" (crop and flip in the step)."""
    where = data.get("augment_at", "host")
    if where not in AUGMENT_AT:
        raise ValueError(f"config.data.augment_at={where!r}: use one of {list(AUGMENT_AT)}")
    if where == "device" and not data.get("host_uint8", True):
        raise ValueError("config.data.augment_at='device' needs config.data.host_uint8=True (the step crops the "
                         "uint8 view)")
    return where


def device_view_inputs(image: np.ndarray, rng: np.random.Generator, size: int, *, crop_scale=(0.2, 1.0),
                       flip: bool = True, randaugment=(2, 7)) -> dict:
    """The host half of augment_at="device": pretrain_augment's draws from `rng` in its order (crop box, flip,
    RandAugment), so either path gives a record the same box and flip. Returns {images: uint8 [size, size, 3]
    (the whole image, resized; RandAugment applied to it), crop_box: float32 (top, left, h, w) in its pixels,
    flip: uint8 0/1}; `pipeline.crop_resize_flip` finishes the view on device."""
    img = to_rgb(image)
    width, height = img.size
    top, left, h, w = random_resized_crop_box(rng, height, width, tuple(crop_scale))
    flipped = bool(flip) and rng.random() < 0.5
    if (width, height) != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    if randaugment:
        img = rand_augment(img, rng, int(randaugment[0]), int(randaugment[1]))
    sy, sx = size / height, size / width
    return {"images": np.asarray(img), "crop_box": np.array([top * sy, left * sx, h * sy, w * sx], np.float32),
            "flip": np.uint8(flipped)}


# CLIP's mean/std, which ALBEF/MUMC normalise with.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 normalised."""
    return (np.asarray(image_uint8, np.float32) / 255.0 - MEAN) / STD
