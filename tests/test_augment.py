"""Host-side augmentation: crop/flip geometry, RandAugment ops, mixup/CutMix
label bookkeeping, config validation and determinism."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from dualflow.data.augment import (
    FILL_VALUE,
    RAND_AUGMENT_OPS,
    AugmentConfig,
    apply_op,
    augment_batch,
    cutmix,
    mix_batch,
    mixup,
    one_hot,
    op_value,
    rand_augment,
    random_crop,
    random_flip,
)

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _images(rng, shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _constant_batch(b, h, w, c=1):
    """Image i is the constant (i + 1) / (b + 1): pixels identify their source."""
    levels = (np.arange(b, dtype=np.float32) + 1) / (b + 1)
    return np.broadcast_to(levels[:, None, None, None], (b, h, w, c)).copy(), levels


# ---------------------------------------------------------------------------
# determinism / pipeline


ALL_ON = AugmentConfig(
    crop_pad=4,
    flip=True,
    randaugment_ops=2,
    randaugment_magnitude=9.0,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
)


def test_augment_batch_deterministic_given_generator_state():
    rng = np.random.default_rng(0)
    x, y = _images(rng, (32, 16, 16, 3)), rng.integers(0, 10, 32)
    out = [augment_batch(x, y, ALL_ON, 10, np.random.default_rng(s)) for s in (7, 7, 8)]
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert not np.array_equal(out[0][0], out[2][0])
    xa, ya = out[0]
    assert xa.dtype == np.float32 and xa.shape == x.shape
    assert 0.0 <= xa.min() and xa.max() <= 1.0
    assert ya.dtype == np.float32 and ya.shape == (32, 10)
    np.testing.assert_allclose(ya.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(x, _images(np.random.default_rng(0), x.shape))


def test_augment_batch_without_mixing_keeps_integer_labels():
    rng = np.random.default_rng(1)
    x, y = _images(rng, (8, 6, 6, 1)), rng.integers(0, 5, 8)
    xo, yo = augment_batch(x, y, AugmentConfig(), 5, rng)
    np.testing.assert_array_equal(xo, x.astype(np.float32) / 255)
    assert yo.dtype == np.int32
    np.testing.assert_array_equal(yo, y)
    # crop + flip only: still integer labels, values are input pixels or pad 0
    cfg = AugmentConfig(crop_pad=2, flip=True)
    assert not cfg.mixes
    xo, yo = augment_batch(x, y, cfg, 5, rng)
    assert yo.dtype == np.int32 and xo.dtype == np.float32
    allowed = np.union1d(np.unique(x), [0]).astype(np.float32) / 255
    assert np.isin(xo, allowed).all()


# ---------------------------------------------------------------------------
# crop / flip


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_random_crop_is_a_window_of_the_padded_image(mode):
    rng = np.random.default_rng(2)
    b, h, w, c, pad = 400, 7, 9, 2, 2
    x = _images(rng, (b, h, w, c))
    out = random_crop(x, rng, pad, mode=mode)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    if mode == "constant":
        assert (padded[:, :pad] == 0).all()
    offsets = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    match = np.stack(
        [
            (padded[:, dy : dy + h, dx : dx + w] == out).all(axis=(1, 2, 3))
            for dy, dx in offsets
        ],
        axis=1,
    )  # [B, (2p+1)^2]
    # random content: exactly one window matches each output
    np.testing.assert_array_equal(match.sum(1), 1)
    counts = match.sum(0)
    assert (counts > 0).all(), counts  # every offset in [0, 2p]^2 is used
    # and roughly uniformly: chi-square against the uniform distribution
    assert stats.chisquare(counts).pvalue > 1e-4


def test_random_crop_pad_zero_is_a_copy():
    rng = np.random.default_rng(3)
    x = _images(rng, (5, 4, 4, 3))
    out = random_crop(x, rng, 0)
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)
    with pytest.raises(ValueError, match="pad"):
        random_crop(x, rng, -1)
    with pytest.raises(ValueError, match="mode"):
        random_crop(x, rng, 1, mode="wrap")


def test_random_flip_mirrors_about_half():
    rng = np.random.default_rng(4)
    b = 2000
    x = _images(rng, (b, 4, 5, 1))
    out = random_flip(x, rng)
    assert out.shape == x.shape and out.dtype == x.dtype
    same = (out == x).all(axis=(1, 2, 3))
    mirrored = (out == x[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all()
    assert not (same & mirrored).any()  # random images are never symmetric
    flipped = mirrored.sum()
    assert abs(flipped - b / 2) <= 5 * np.sqrt(b / 4), flipped


# ---------------------------------------------------------------------------
# RandAugment ops


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", GEOMETRIC)
def test_geometric_ops_at_magnitude_zero_are_identity(op, channels):
    x = _images(np.random.default_rng(5), (16, 12, channels))
    for sign in (-1, 1):
        value = op_value(op, 0.0, 10.0, sign)
        assert value == 0
        np.testing.assert_array_equal(apply_op(x, op, value), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_magnitude_zero_is_identity_except_autocontrast_equalize(channels):
    x = _images(np.random.default_rng(6), (10, 11, channels))
    for op in RAND_AUGMENT_OPS:
        if op in ("AutoContrast", "Equalize"):
            continue
        for sign in (-1, 1):
            out = apply_op(x, op, op_value(op, 0.0, 10.0, sign))
            np.testing.assert_array_equal(out, x, err_msg=op)


def test_op_values_follow_the_standard_ranges():
    m = 10.0
    assert op_value("Rotate", m, m, 1) == pytest.approx(30.0)
    assert op_value("Rotate", m, m, -1) == pytest.approx(-30.0)
    assert op_value("ShearX", 5.0, m, -1) == pytest.approx(-0.15)
    assert op_value("TranslateY", m, m, 1) == pytest.approx(0.45)
    assert op_value("Solarize", 0.0, m) == 256
    assert op_value("Solarize", m, m) == 0
    assert op_value("Posterize", 0.0, m) == 8
    assert op_value("Posterize", m, m) == 4
    for op in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert op_value(op, m, m, 1) == pytest.approx(1.9)
        assert op_value(op, m, m, -1) == pytest.approx(0.1)
    # unsigned ops ignore the sign
    assert op_value("Solarize", 5.0, m, -1) == op_value("Solarize", 5.0, m, 1)
    assert op_value("Identity", m, m) is None


@pytest.mark.parametrize("channels", [1, 3])
def test_solarize_inverts_exactly_pixels_at_or_above_threshold(channels):
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(channels, -1)
    for t in (0, 1, 77, 128, 255, 256):
        expected = np.where(x >= t, 255 - x, x).astype(np.uint8)
        np.testing.assert_array_equal(apply_op(x, "Solarize", t), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_posterize_keeps_top_bits(channels):
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(channels, -1)
    for bits in range(1, 9):
        mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
        np.testing.assert_array_equal(apply_op(x, "Posterize", bits), x & mask)


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_translate_rotate_exact_geometry(channels):
    x = _images(np.random.default_rng(7), (8, 8, channels))
    np.testing.assert_array_equal(apply_op(x, "Identity", None), x)
    # translate by a whole number of pixels: a shift with grey fill
    k = 3
    left = apply_op(x, "TranslateX", k / 8)
    np.testing.assert_array_equal(left[:, : 8 - k], x[:, k:])
    assert (left[:, 8 - k :] == FILL_VALUE).all()
    right = apply_op(x, "TranslateX", -k / 8)
    np.testing.assert_array_equal(right[:, k:], x[:, : 8 - k])
    up = apply_op(x, "TranslateY", k / 8)
    np.testing.assert_array_equal(up[: 8 - k], x[k:])
    assert (up[8 - k :] == FILL_VALUE).all()
    np.testing.assert_array_equal(apply_op(x, "Rotate", 180.0), x[::-1, ::-1])
    # a 30 degree rotation uncovers the corners, which get the fill value
    rot = apply_op(x, "Rotate", 30.0)
    assert (rot[[0, 0, -1, -1], [0, -1, 0, -1]] == FILL_VALUE).all()


def test_color_is_identity_on_grayscale():
    x = _images(np.random.default_rng(8), (6, 6, 1))
    for f in (0.1, 1.9):
        np.testing.assert_array_equal(apply_op(x, "Color", f), x)
    # but not on colour images
    xc = _images(np.random.default_rng(8), (6, 6, 3))
    assert not np.array_equal(apply_op(xc, "Color", 0.1), xc)


@pytest.mark.parametrize("channels", [1, 3])
def test_all_ops_run_and_keep_shape_and_dtype(channels):
    x = _images(np.random.default_rng(9), (13, 10, channels))
    for op in RAND_AUGMENT_OPS:
        for sign in (-1, 1):
            out = apply_op(x, op, op_value(op, 9.0, 10.0, sign))
            assert out.dtype == np.uint8 and out.shape == x.shape, op
    rng = np.random.default_rng(10)
    batch = _images(rng, (20, 13, 10, channels))
    out = rand_augment(batch, rng, num_ops=3, magnitude=9.0)
    assert out.dtype == np.uint8 and out.shape == batch.shape
    np.testing.assert_array_equal(rand_augment(batch, rng, num_ops=0), batch)


def test_rand_augment_applies_one_listed_op_per_image():
    """With one op per image, each output is the input under one of the 14 ops
    at the configured magnitude with one of the two signs; the ops used cover
    the list."""
    rng = np.random.default_rng(11)
    x = _images(rng, (150, 12, 12, 3))
    out = rand_augment(x, rng, num_ops=1, magnitude=7.0)
    used = set()
    for i in range(len(x)):
        hits = {
            op
            for op in RAND_AUGMENT_OPS
            for sign in (-1, 1)
            if np.array_equal(out[i], apply_op(x[i], op, op_value(op, 7.0, 10, sign)))
        }
        assert hits, i
        used |= hits
    assert used == set(RAND_AUGMENT_OPS)


def test_rand_augment_validates_arguments():
    rng = np.random.default_rng(12)
    x = _images(rng, (2, 4, 4, 3))
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment(x, rng, magnitude=11.0)
    with pytest.raises(ValueError, match="uint8"):
        rand_augment(x.astype(np.float32), rng)
    with pytest.raises(ValueError, match="channels"):
        rand_augment(_images(rng, (2, 4, 4, 2)), rng)


# ---------------------------------------------------------------------------
# labels, mixup, CutMix


def test_one_hot():
    y = one_hot(np.array([2, 0, 3]), 4)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.eye(4, dtype=np.float32)[[2, 0, 3]])
    with pytest.raises(ValueError, match="labels"):
        one_hot(np.array([0, 4]), 4)


def _read_mixup(y_mixed):
    """Per example: own weight, and the partner (-1 when the example is its own
    partner), from labels of a batch whose example i has class i."""
    lam = np.diag(y_mixed).copy()
    other = y_mixed - np.diag(lam)
    partner = np.where(other.max(1) > 0, other.argmax(1), -1)
    return lam, partner


def test_mixup_mixes_inputs_and_labels_with_the_same_lambda():
    b = 8
    rng = np.random.default_rng(13)
    for _ in range(20):
        x = rng.normal(size=(b, 5, 4, 3)).astype(np.float32)
        y = one_hot(np.arange(b), b)
        xm, ym = mixup(x, y, rng, alpha=1.0)
        assert xm.dtype == np.float32 and ym.dtype == np.float32
        np.testing.assert_allclose(ym.sum(1), 1.0, rtol=1e-6)
        lam, partner = _read_mixup(ym)
        moved = partner >= 0
        assert moved.any()
        # one lambda per batch, partners form a permutation
        np.testing.assert_allclose(lam[moved], lam[moved][0], rtol=1e-6)
        perm = np.where(moved, partner, np.arange(b))
        np.testing.assert_array_equal(np.sort(perm), np.arange(b))
        lam_b = lam[moved][0]
        expected = lam_b * x + (1 - lam_b) * x[perm]
        np.testing.assert_allclose(xm, expected, rtol=1e-5, atol=1e-6)


def test_mixup_lambda_is_beta_distributed():
    alpha, n, b = 0.4, 2000, 6
    rng = np.random.default_rng(14)
    x = np.zeros((b, 1, 1, 1), np.float32)
    y = one_hot(np.arange(b), b)
    lams = []
    for _ in range(n):
        _, ym = mixup(x, y, rng, alpha)
        lam, partner = _read_mixup(ym)
        if (partner >= 0).any():  # lambda is invisible under the identity perm
            lams.append(lam[partner >= 0][0])
    lams = np.asarray(lams, dtype=np.float64)
    mean, var = 0.5, alpha**2 / ((2 * alpha) ** 2 * (2 * alpha + 1))
    assert abs(lams.mean() - mean) < 5 * np.sqrt(var / len(lams))
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-4


def test_cutmix_label_weight_equals_pasted_pixel_fraction():
    b, h, w = 6, 16, 12
    rng = np.random.default_rng(15)
    x, levels = _constant_batch(b, h, w, 2)
    y = one_hot(np.arange(b), b)
    fractions = []
    for _ in range(200):
        xm, ym = cutmix(x, y, rng, alpha=1.0)
        assert xm.dtype == np.float32 and xm.shape == x.shape
        np.testing.assert_allclose(ym.sum(1), 1.0, rtol=1e-6)
        changed = (xm != x).any(-1)  # [B, H, W]
        boxes = {tuple(np.flatnonzero(c.any(1)).tolist()) for c in changed if c.any()}
        assert len(boxes) <= 1  # one box per batch
        for i in range(b):
            frac = changed[i].mean()
            if frac == 0:
                assert ym[i, i] == pytest.approx(1.0)
                continue
            # the changed pixels form a rectangle holding one partner's value
            rows, cols = (
                np.flatnonzero(changed[i].any(1)),
                np.flatnonzero(changed[i].any(0)),
            )
            assert changed[i][np.ix_(rows, cols)].all()
            assert changed[i].sum() == len(rows) * len(cols)
            assert rows[-1] - rows[0] + 1 == len(rows)
            assert cols[-1] - cols[0] + 1 == len(cols)
            values = np.unique(xm[i][changed[i]])
            assert len(values) == 1
            j = int(np.flatnonzero(np.isclose(levels, values[0]))[0])
            assert j != i
            assert ym[i, j] == pytest.approx(frac, abs=1e-6)
            assert ym[i, i] == pytest.approx(1 - frac, abs=1e-6)
            fractions.append(frac)
    # clipping at the border shrinks boxes: the mean pasted area stays below
    # E[1 - lam] = 0.5 but is a sizeable fraction of it
    assert 0.2 < np.mean(fractions) < 0.5


def test_mix_batch_modes():
    b, k = 6, 6
    x, _ = _constant_batch(b, 8, 8)
    y_int = np.arange(b)
    rng = np.random.default_rng(16)
    xo, yo = mix_batch(x, y_int, k, rng)
    np.testing.assert_array_equal(xo, x)
    np.testing.assert_array_equal(yo, one_hot(y_int, k))

    def is_cutmix(xo):  # mixup keeps constant images constant
        return bool((xo.max(axis=(1, 2, 3)) != xo.min(axis=(1, 2, 3))).any())

    for _ in range(10):
        assert not is_cutmix(mix_batch(x, y_int, k, rng, mixup_alpha=1.0)[0])
        assert not is_cutmix(mix_batch(x, y_int, k, rng, 1.0, 1.0, switch_prob=0.0)[0])
    hits = [
        is_cutmix(mix_batch(x, y_int, k, rng, cutmix_alpha=1.0)[0]) for _ in range(20)
    ]
    assert sum(hits) >= 18  # misses only for an empty box or identity perm
    n, p = 400, 0.3
    hits = sum(
        is_cutmix(mix_batch(x, y_int, k, rng, 1.0, 1.0, switch_prob=p)[0])
        for _ in range(n)
    )
    assert abs(hits - n * p) < 5 * np.sqrt(n * p * (1 - p)), hits


# ---------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "field",
    [
        "crop_pad",
        "randaugment_ops",
        "randaugment_magnitude",
        "mixup_alpha",
        "cutmix_alpha",
    ],
)
def test_config_rejects_negative_values_naming_the_field(field):
    with pytest.raises(ValueError, match=rf"augment\.{field} must be >= 0, got -1"):
        AugmentConfig(**{field: -1})


def test_config_other_checks_and_mixes():
    with pytest.raises(ValueError, match=r"augment\.switch_prob"):
        AugmentConfig(switch_prob=1.5)
    with pytest.raises(ValueError, match=r"augment\.randaugment_magnitude"):
        AugmentConfig(randaugment_magnitude=12.0)
    cfg = AugmentConfig()
    assert not cfg.mixes
    assert AugmentConfig(mixup_alpha=0.2).mixes
    assert AugmentConfig(cutmix_alpha=1.0).mixes
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.crop_pad = 3  # type: ignore[misc]
