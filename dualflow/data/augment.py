"""Host-side data augmentation for image classification batches.

Everything runs in numpy (RandAugment uses PIL per image) on the host, before a
batch is sent to the device.  Images are ``uint8 [B, H, W, C]`` with ``C`` 1 or
3, channels last.  Every random choice is drawn from the ``np.random.Generator``
passed in, so the same generator state gives the same output.

RandAugment (Cubuk et al., 2020) conventions used here, with ``r = m / m_max``:

* Rotate: ``+-30 r`` degrees; ShearX/Y: ``+-0.3 r``; TranslateX/Y: ``+-0.45 r``
  of the image width/height, rounded to whole pixels.  Geometric ops resample
  bilinearly and fill uncovered pixels with 128 (mid grey).
* Solarize: threshold ``256 - round(256 r)`` (256: no-op, 0: invert all);
  Posterize: keep ``8 - round(4 r)`` bits (8: no-op, 4 at full magnitude).
* Color/Contrast/Brightness/Sharpness: enhancement factor ``1 +- 0.9 r``
  (1: no-op).  Color is the identity for grayscale images.
* Signed ops (geometric and enhancement ops) take a random sign per application.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "FILL_VALUE",
    "RAND_AUGMENT_OPS",
    "AugmentConfig",
    "apply_op",
    "augment_batch",
    "cutmix",
    "mix_batch",
    "mixup",
    "one_hot",
    "op_value",
    "rand_augment",
    "random_crop",
    "random_flip",
]

FILL_VALUE = 128  # grey fill for pixels uncovered by geometric ops

RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Solarize",
    "Color",
    "Posterize",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)

# parameter at full magnitude; signed ops take a random sign per application
_MAX_ROTATE_DEG = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.45  # fraction of the image size
_MAX_ENHANCE = 0.9
_SIGNED = frozenset(
    {
        "Rotate",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
    }
)


def _check_images(x: np.ndarray, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be [B, H, W, C], got shape {x.shape}")


# ----------------------------------------------------------------------------
# crop / flip (vectorised)


def random_crop(
    x: np.ndarray, rng: np.random.Generator, pad: int, mode: str = "constant"
) -> np.ndarray:
    """Pad-and-crop: ``[B, H, W, C] -> [B, H, W, C]``, same dtype.

    Each image is padded by ``pad`` on every side (zeros for ``mode="constant"``,
    mirror without edge repeat for ``mode="reflect"``) and an ``H x W`` window is
    taken at offsets drawn uniformly from ``{0, ..., 2 pad}`` per axis, per image.
    ``pad=0`` returns an unchanged copy.
    """
    _check_images(x)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if mode not in ("constant", "reflect"):
        raise ValueError(f"mode must be 'constant' or 'reflect', got {mode!r}")
    if pad == 0:
        return x.copy()
    b, h, w, _ = x.shape
    if mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < {min(h, w)}, got {pad}")
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    padded = np.pad(x, widths, mode=mode)
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
    # all windows as a strided view [B, 2p+1, 2p+1, 1, H, W, C]; pick one each
    windows = sliding_window_view(padded, x.shape[1:], axis=(1, 2, 3))
    return windows[np.arange(b), dy, dx, 0]


def random_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image left-right with probability 0.5: ``[B, H, W, C]``."""
    _check_images(x)
    flip = rng.random(x.shape[0]) < 0.5
    out = x.copy()
    out[flip] = x[flip, :, ::-1]
    return out


# ----------------------------------------------------------------------------
# RandAugment


def op_value(
    op: str, magnitude: float, max_magnitude: float = 10.0, sign: int = 1
) -> float | int | None:
    """The parameter of ``op`` at ``magnitude`` (see the module docstring).

    Degrees for Rotate, shear factor for ShearX/Y, fraction of the size for
    TranslateX/Y, threshold for Solarize, bits for Posterize, enhancement
    factor for Color/Contrast/Brightness/Sharpness, ``None`` for parameter-free
    ops.  ``sign`` (+1 or -1) applies to the signed ops only.
    """
    if op not in RAND_AUGMENT_OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {RAND_AUGMENT_OPS}")
    r = float(magnitude) / float(max_magnitude)
    s = sign if op in _SIGNED else 1
    if op == "Rotate":
        return s * _MAX_ROTATE_DEG * r
    if op in ("ShearX", "ShearY"):
        return s * _MAX_SHEAR * r
    if op in ("TranslateX", "TranslateY"):
        return s * _MAX_TRANSLATE * r
    if op == "Solarize":
        return 256 - round(256 * r)
    if op == "Posterize":
        return 8 - round(4 * r)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return 1.0 + s * _MAX_ENHANCE * r
    return None


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return FILL_VALUE if img.mode == "L" else (FILL_VALUE,) * 3


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    # PIL maps each output pixel through ``matrix`` to the input pixel it reads.
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        matrix,
        resample=Image.Resampling.BILINEAR,
        fillcolor=_fill(img),
    )


def _rotate(img: Image.Image, deg: float) -> Image.Image:
    return img.rotate(deg, resample=Image.Resampling.BILINEAR, fillcolor=_fill(img))


def _color(img: Image.Image, factor: float) -> Image.Image:
    if img.mode == "L":
        return img
    return ImageEnhance.Color(img).enhance(factor)


_OPS: dict[str, Callable[[Image.Image, object], Image.Image]] = {
    "Identity": lambda img, v: img,
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Rotate": _rotate,
    # ImageOps.solarize inverts exactly the pixels >= threshold
    "Solarize": lambda img, v: ImageOps.solarize(img, int(v)),
    "Color": _color,
    "Posterize": lambda img, v: ImageOps.posterize(img, int(v)),
    "Contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "Brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "Sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "ShearX": lambda img, v: _affine(img, (1.0, v, 0.0, 0.0, 1.0, 0.0)),
    "ShearY": lambda img, v: _affine(img, (1.0, 0.0, 0.0, v, 1.0, 0.0)),
    "TranslateX": lambda img, v: _affine(
        img, (1.0, 0.0, round(v * img.size[0]), 0.0, 1.0, 0.0)
    ),
    "TranslateY": lambda img, v: _affine(
        img, (1.0, 0.0, 0.0, 0.0, 1.0, round(v * img.size[1]))
    ),
}


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img)
    return arr[:, :, None] if channels == 1 else arr


def apply_op(image: np.ndarray, op: str, value: float | int | None) -> np.ndarray:
    """Apply one RandAugment op with parameter ``value`` (see :func:`op_value`)
    to one ``uint8 [H, W, C]`` image; returns a new ``uint8 [H, W, C]`` array.

    Translations move the content by ``-round(value * size)`` pixels.
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {RAND_AUGMENT_OPS}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}"
        )
    out = _OPS[op](_to_pil(image), value)
    return _from_pil(out, image.shape[-1]).copy()


def rand_augment(
    x: np.ndarray,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 9.0,
    max_magnitude: float = 10.0,
) -> np.ndarray:
    """RandAugment: ``uint8 [B, H, W, C] -> uint8 [B, H, W, C]`` (C = 1 or 3).

    Each image gets ``num_ops`` ops drawn uniformly with replacement from
    :data:`RAND_AUGMENT_OPS`, all at the same ``magnitude`` in
    ``[0, max_magnitude]``; signed ops draw a random sign per application.
    """
    _check_images(x)
    if x.dtype != np.uint8 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"x must be uint8 with 1 or 3 channels, got {x.dtype} {x.shape}"
        )
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    if max_magnitude <= 0 or not 0 <= magnitude <= max_magnitude:
        raise ValueError(
            f"need 0 <= magnitude <= max_magnitude (> 0), got {magnitude}, "
            f"{max_magnitude}"
        )
    b, channels = x.shape[0], x.shape[-1]
    ops = rng.integers(0, len(RAND_AUGMENT_OPS), size=(b, num_ops))
    positive = (rng.random((b, num_ops)) < 0.5).tolist()  # sign of signed ops
    # parameter table [positive, op] so the per-image loop only looks values up
    table = [
        [op_value(op, magnitude, max_magnitude, s) for op in RAND_AUGMENT_OPS]
        for s in (-1, 1)
    ]
    fns = [_OPS[op] for op in RAND_AUGMENT_OPS]
    ops = ops.tolist()
    out = np.empty_like(x)
    for i in range(b):
        img = _to_pil(x[i])
        for j, pos in zip(ops[i], positive[i], strict=True):
            img = fns[j](img, table[pos][j])
        out[i] = _from_pil(img, channels)
    return out


# ----------------------------------------------------------------------------
# label mixing


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels ``[B]`` -> ``float32 [B, K]`` one-hot rows."""
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}"
        )
    return np.eye(num_classes, dtype=np.float32)[y]


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def mixup(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mixup (Zhang et al., 2018) of ``float32 [B, ...]`` inputs, ``[B, K]`` labels.

    One ``lam ~ Beta(alpha, alpha)`` per batch; each example is mixed with its
    partner under a random permutation: ``lam * x + (1 - lam) * x[perm]``,
    likewise for ``y``.  Returns float32 ``(x', y')`` of the input shapes.
    """
    _check_alpha(alpha)
    lam = np.float32(rng.beta(alpha, alpha))
    perm = rng.permutation(x.shape[0])
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def cutmix(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """CutMix (Yun et al., 2019) of ``float32 [B, H, W, C]`` inputs, ``[B, K]`` labels.

    One ``lam ~ Beta(alpha, alpha)`` and one box per batch: a box of area
    fraction ``1 - lam`` (side ``sqrt(1 - lam)`` of each dimension, rounded down)
    with its centre uniform over the pixels, clipped to the image, is pasted
    from each example's partner under a random permutation.  Labels are mixed
    by the area fraction actually pasted after clipping.
    """
    _check_alpha(alpha)
    _check_images(x)
    b, h, w = x.shape[:3]
    lam = rng.beta(alpha, alpha)
    perm = rng.permutation(b)
    side = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * side), int(w * side)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = np.clip([cy - cut_h // 2, cy - cut_h // 2 + cut_h], 0, h)
    x0, x1 = np.clip([cx - cut_w // 2, cx - cut_w // 2 + cut_w], 0, w)
    out = np.array(x, dtype=np.float32)
    out[:, y0:y1, x0:x1] = out[perm, y0:y1, x0:x1]
    keep = np.float32(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
    y = np.asarray(y, dtype=np.float32)
    return out, keep * y + (1 - keep) * y[perm]


def mix_batch(
    x: np.ndarray,
    y_int: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Mixup and/or CutMix: ``(float32 [B, H, W, C], int [B]) ->
    (float32 [B, H, W, C], float32 [B, K])``.

    With both alphas > 0, each batch uses CutMix with probability
    ``switch_prob`` and mixup otherwise (the timm convention); with one > 0,
    that one; with neither, ``x`` unchanged (as float32) and one-hot labels.
    """
    y = one_hot(y_int, num_classes)
    x = np.asarray(x, dtype=np.float32)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = rng.random() < switch_prob
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = cutmix_alpha > 0
    else:
        return x, y
    if use_cutmix:
        return cutmix(x, y, rng, cutmix_alpha)
    return mixup(x, y, rng, mixup_alpha)


# ----------------------------------------------------------------------------
# configured pipeline


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; the defaults switch everything off."""

    crop_pad: int = 0
    flip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    def __post_init__(self):
        for name in (
            "crop_pad",
            "randaugment_ops",
            "randaugment_magnitude",
            "mixup_alpha",
            "cutmix_alpha",
        ):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"augment.{name} must be >= 0, got {value}")
        if self.randaugment_magnitude > 10:
            raise ValueError(
                "augment.randaugment_magnitude must be <= 10, got "
                f"{self.randaugment_magnitude}"
            )
        if not 0 <= self.switch_prob <= 1:
            raise ValueError(
                f"augment.switch_prob must be in [0, 1], got {self.switch_prob}"
            )

    @property
    def mixes(self) -> bool:
        """Whether labels come out soft (mixup or CutMix is on)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def augment_batch(
    x_uint8: np.ndarray,
    y_int: np.ndarray,
    cfg: AugmentConfig,
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a ``uint8 [B, H, W, C]`` batch with integer labels ``[B]``.

    Order: RandAugment (uint8) -> pad-and-crop -> flip -> scale to float32 in
    ``[0, 1]`` -> mixup/CutMix.  Returns ``(float32 [B, H, W, C], y)`` with
    ``y`` int32 ``[B]`` when ``cfg.mixes`` is False, else float32 ``[B, K]``.
    """
    _check_images(x_uint8, "x_uint8")
    if x_uint8.dtype != np.uint8:
        raise ValueError(f"x_uint8 must be uint8, got {x_uint8.dtype}")
    x = x_uint8
    if cfg.randaugment_ops > 0:
        x = rand_augment(x, rng, cfg.randaugment_ops, cfg.randaugment_magnitude)
    if cfg.crop_pad > 0:
        x = random_crop(x, rng, cfg.crop_pad)
    if cfg.flip:
        x = random_flip(x, rng)
    xf = x.astype(np.float32) / np.float32(255.0)
    if not cfg.mixes:
        return xf, np.asarray(y_int, dtype=np.int32)
    return mix_batch(
        xf,
        y_int,
        num_classes,
        rng,
        cfg.mixup_alpha,
        cfg.cutmix_alpha,
        cfg.switch_prob,
    )
