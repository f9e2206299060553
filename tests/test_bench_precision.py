"""Emulated accelerator matmul precision and the bf16-operand moment products.

The rounding helpers are checked bit for bit, the emulator against products
of hand-rounded operands, and ``precision="bf16_compute"`` by its jaxpr
(bfloat16 operands, float32 result, float32 gradients) and its values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dualflow import Gaussian, moments
from dualflow.benchmarks import precision as bp
from dualflow.moments._conv_cpu import using_conv_impl

HI = lax.Precision.HIGHEST


def _bits(u: list[int]) -> jax.Array:
    return lax.bitcast_convert_type(jnp.asarray(np.array(u, np.uint32)), jnp.float32)


def _as_bits(x: jax.Array) -> list[int]:
    return np.asarray(lax.bitcast_convert_type(x, jnp.uint32)).tolist()


# --------------------------------------------------------------------------
# rounding helpers
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, want",
    [
        (0x3F800000, 0x3F800000),  # 1.0
        (0x3F800FFF, 0x3F800000),  # below half an ulp: down
        (0x3F801000, 0x3F800000),  # tie, kept lsb 0: stays even
        (0x3F801001, 0x3F802000),  # above the tie: up
        (0x3F803000, 0x3F804000),  # tie, kept lsb 1: up to even
        (0xBF803000, 0xBF804000),  # sign is kept
        (0x3FFFF000, 0x40000000),  # carry into the exponent: 2.0
        (0x7F7FFFFF, 0x7F800000),  # float32 max rounds to inf
        (0x7F800000, 0x7F800000),  # inf
        (0x00000000, 0x00000000),
    ],
)
def test_round_tf32_bit_patterns(given, want):
    assert _as_bits(bp.round_tf32(_bits([given]))) == [want]


def test_round_tf32_keeps_nan_and_exact_tf32_values():
    x = jnp.array([jnp.nan, 1.0 + 2.0**-10, -3.5, 2.0**-100])
    y = bp.round_tf32(x)
    assert bool(jnp.isnan(y[0]))
    np.testing.assert_array_equal(y[1:], x[1:])
    # 1 + 2^-11 is a tie between 1 and 1 + 2^-10: ties go to the even 1.0
    assert float(bp.round_tf32(jnp.float32(1.0 + 2.0**-11))) == 1.0
    assert float(bp.round_tf32(jnp.float32(1.0 + 3 * 2.0**-11))) == 1.0 + 2.0**-9


def test_round_bf16_equals_the_bfloat16_conversion():
    rng = np.random.default_rng(0)
    u = rng.integers(0x00800000, 0x7F000000, 20000, dtype=np.uint32)  # normals
    u[:100] = (u[:100] & 0xFFFF0000) | 0x8000  # exact ties
    u[100:200] = (u[100:200] & 0xFFFF0000) | 0x18000  # ties, odd kept bit
    x = _bits(u.tolist())
    x = jnp.concatenate([x, -x])
    want = x.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(_as_bits(bp.round_bf16(x)), _as_bits(want))


def test_round_mantissa_rejects_other_dtypes_and_keeps_23_bits():
    with pytest.raises(TypeError, match="float32"):
        bp.round_mantissa(jnp.ones(2, jnp.bfloat16), 7)
    x = jnp.float32(1.0 + 2.0**-23)
    assert float(bp.round_mantissa(x, 23)) == float(x)
    assert float(bp.round_mantissa(x, 22)) == 1.0


def test_split_bf16_parts_are_bfloat16_and_sum_to_16_bits():
    x = jax.random.normal(jax.random.key(0), (1000,))
    hi, lo = bp.split_bf16(x)
    for part in (hi, lo):
        np.testing.assert_array_equal(
            part, part.astype(jnp.bfloat16).astype(jnp.float32)
        )
    rel = jnp.abs(hi + lo - x) / jnp.abs(x)
    assert float(rel.max()) <= 2.0**-16
    assert float(jnp.abs(hi - x).max()) > 0  # the split is not trivial


# --------------------------------------------------------------------------
# the emulator
# --------------------------------------------------------------------------
KEY = jax.random.split(jax.random.key(1), 6)
X = jax.random.normal(KEY[0], (8, 300))
W = jax.random.normal(KEY[1], (300, 5))


@pytest.mark.parametrize("jit", [False, True])
def test_emulated_matmul_equals_hand_rounded_operands(jit):
    def f(x, w):
        return {"y": x @ w}

    plain = jnp.matmul(X, W, precision=HI)
    for mode, rnd in (("tf32", bp.round_tf32), ("bf16", bp.round_bf16)):
        g = bp.emulate_precision(f, mode)
        got = (jax.jit(g) if jit else g)(X, W)["y"]
        np.testing.assert_array_equal(got, jnp.matmul(rnd(X), rnd(W), precision=HI))
        assert float(jnp.abs(got - plain).max()) > 1e-4  # rounding is visible
    (xh, xl), (wh, wl) = bp.split_bf16(X), bp.split_bf16(W)
    want = (xh @ wl + xl @ wh) + xh @ wh
    np.testing.assert_array_equal(bp.emulate_precision(f, "bf16x3")(X, W)["y"], want)
    np.testing.assert_array_equal(bp.emulate_precision(f, "highest")(X, W)["y"], plain)


def test_emulated_conv_inside_jit_and_custom_vjp():
    x = Gaussian(jax.random.normal(KEY[2], (2, 6, 6, 3)), jnp.full((2, 6, 6, 3), 0.1))
    wm = jax.random.normal(KEY[3], (3, 3, 3, 4))
    wv = jax.random.uniform(KEY[4], (3, 3, 3, 4))

    @jax.jit
    def layer(m, wm, wv):  # the conv sits inside jit and the BP custom_vjp
        return moments.conv(Gaussian(m, x.var), wm, wv).mean

    def hand(m, w):
        return lax.conv_general_dilated(
            bp.round_tf32(m), bp.round_tf32(w), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HI,
        )  # fmt: skip

    got = bp.emulate_precision(layer, "tf32")(x.mean, wm, wv)
    np.testing.assert_array_equal(got, hand(x.mean, wm))
    assert float(jnp.abs(got - layer(x.mean, wm, wv)).max()) > 1e-5


def test_emulator_leaves_non_float32_products_and_refuses_scan():
    xb, wb = X.astype(jnp.bfloat16), W.astype(jnp.bfloat16)
    f = lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    np.testing.assert_array_equal(bp.emulate_precision(f, "tf32")(xb, wb), f(xb, wb))

    def scanned(x, w):
        return lax.scan(lambda c, _: (c @ w, None), x, None, length=2)[0]

    with pytest.raises(NotImplementedError, match=r"'scan' carries a sub-jaxpr"):
        bp.emulate_precision(scanned, "bf16")(X[:, :5], W[:5])
    with pytest.raises(ValueError, match="mode 'fp8'"):
        bp.emulate_precision(f, "fp8")


# --------------------------------------------------------------------------
# bf16 compute of the moment products
# --------------------------------------------------------------------------
def _products(jaxpr) -> list[tuple[str, str, str]]:
    """``(lhs dtype, rhs dtype, out dtype)`` of every dot/conv, nested included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(
                tuple(str(v.aval.dtype) for v in (*eqn.invars, eqn.outvars[0]))
            )
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _products(inner)
    return found


XD = Gaussian(jax.random.normal(KEY[0], (4, 6)), jax.random.uniform(KEY[1], (4, 6)))
WD, VD = jax.random.normal(KEY[2], (6, 3)), jax.random.uniform(KEY[3], (6, 3))
XC = Gaussian(jax.random.normal(KEY[4], (2, 5, 5, 3)), jnp.full((2, 5, 5, 3), 0.1))
WC = jax.random.normal(KEY[5], (3, 3, 3, 4))
VC = jnp.full((3, 3, 3, 4), 0.01)
BF = ("bfloat16", "bfloat16", "float32")
F32 = ("float32", "float32", "float32")
BACKWARDS = ("bp", "autodiff", "bp_fixed_noise")


def _dense(precision, backward="bp"):
    return lambda x, m, v: moments.dense(
        x, m, v, precision=precision, backward=backward
    )


def _conv(precision, backward="bp"):
    return lambda x, m, v: moments.conv(x, m, v, precision=precision, backward=backward)


def _loss(layer):
    def loss(m, P, mu, s2):
        out = layer(Gaussian(m, P), mu, s2)
        return jnp.sum(out.mean) + jnp.sum(out.var * out.var)

    return loss


@pytest.mark.parametrize(
    "kind, backward, impl",
    [(k, b, "lax") for k in ("dense", "conv") for b in BACKWARDS]
    + [("conv", "bp", "im2col")],  # dense has no impl; im2col: the BP path
)
def test_bf16_compute_products_and_float32_gradients(kind, backward, impl):
    make, x, w, v = (_dense, XD, WD, VD) if kind == "dense" else (_conv, XC, WC, VC)
    args = (x.mean, x.var, w, v)
    with using_conv_impl(impl):
        fwd = _products(jax.make_jaxpr(make("bf16_compute", backward))(x, w, v).jaxpr)
        assert fwd == [BF] * (3 if kind == "dense" else 2)  # mean, variance
        out = make("bf16_compute", backward)(x, w, v)
        assert out.mean.dtype == out.var.dtype == jnp.float32
        grad = jax.grad(_loss(make("bf16_compute", backward)), argnums=(0, 1, 2, 3))
        prods = _products(jax.make_jaxpr(grad)(*args).jaxpr)
        # the backward's products are float32; bf16 ones only recompute the forward
        assert prods.count(F32) >= 3 and set(prods) <= {BF, F32}
        if backward != "autodiff":
            assert prods.count(BF) == len(fwd)
        got = jax.jit(grad)(*args)
        want = jax.jit(jax.grad(_loss(make(None, backward)), argnums=(0, 1, 2, 3)))(
            *args
        )
    for g, h in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        # the forward values differ (bf16), the gradient products do not
        np.testing.assert_allclose(g, h, rtol=0.05, atol=1e-2)
    ref = make(None, backward)(x, w, v)
    err = float(jnp.abs(out.mean - ref.mean).max() / jnp.abs(ref.mean).max())
    assert 1e-5 < err < 2e-2


def test_bf16_compute_bp_gradients_equal_the_float32_rule_exactly():
    """BP keeps only (m, P, mu, s2): with the same cotangents its backward is
    the float32 rule bit for bit."""
    for make, x, w, v in ((_dense, XD, WD, VD), (_conv, XC, WC, VC)):
        cot = make(None)(x, w, v)
        _, vjp16 = jax.vjp(make("bf16_compute"), x, w, v)
        _, vjp32 = jax.vjp(make(None), x, w, v)
        for g, h in zip(
            jax.tree.leaves(vjp16(cot)), jax.tree.leaves(vjp32(cot)), strict=True
        ):
            np.testing.assert_array_equal(g, h)


def test_compute_dtype_context_reaches_layers_with_default_precision():
    assert moments.compute_dtype() is None
    with moments.precision_context("bf16_compute"):
        assert moments.compute_dtype() == "bfloat16"
        prods = _products(jax.make_jaxpr(_dense(None))(XD, WD, VD).jaxpr)
        explicit = _products(jax.make_jaxpr(_dense("highest"))(XD, WD, VD).jaxpr)
    assert moments.compute_dtype() is None
    assert prods == [BF] * 3 and explicit == [F32] * 3  # explicit precision wins
    assert moments.product_settings("bf16_compute") == (None, "bfloat16")
    with pytest.raises(ValueError, match="bf16_compute sets a compute dtype"):
        moments.canonical_precision("bf16_compute")
    with pytest.raises(ValueError, match="compute dtype must be bfloat16"):
        moments.set_compute_dtype("float16")


def test_emulated_bf16_matches_the_real_bf16_compute():
    """Same operand rounding (RNE to bfloat16), float32 accumulation: the
    emulation and the real option differ by accumulation order at most."""
    layer = _dense(None)
    emu = bp.emulate_precision(layer, "bf16")(XD, WD, VD)
    real = _dense("bf16_compute")(XD, WD, VD)
    f32 = layer(XD, WD, VD)
    for a, b, c in ((emu.mean, real.mean, f32.mean), (emu.var, real.var, f32.var)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(a - c).max()) > 1e-4


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
def test_tiny_table_run():
    spec = [("mlp 16", "mlp", {"widths": (16,)}, 1)]
    res = bp.precision_error_table(spec, train_steps=3, n_eval=40, log=lambda s: None)
    rows = {(r["stage"], r["mode"]): r for r in res["rows"]}
    assert len(rows) == 2 * len(bp.TABLE_MODES)
    for stage in ("init", "trained"):
        hi, tf, bf = (rows[stage, m] for m in ("highest", "tf32", "bf16"))
        assert hi["mean_vs_f32"] == (0.0, 0.0) and hi["var_vs_f32"] == (0.0, 0.0)
        assert 0 < hi["mean_vs_f64"][0] < 1e-5  # float32 rounding only
        assert 0 < tf["mean_vs_f64"][0] < bf["mean_vs_f64"][0] < 5e-2
        assert rows[stage, "bf16x3"]["mean_vs_f64"][0] < tf["mean_vs_f64"][0]
        real = rows[stage, "bf16_compute"]["mean_vs_f64"][0]
        assert real == pytest.approx(bf["mean_vs_f64"][0], rel=0.2)
    table = bp.markdown_table(res)
    assert table.count("\n| mlp 16 |") == 2 * len(bp.TABLE_MODES)
    assert res["setup"]["train_steps"] == 3


def test_relative_error_normalises_per_output():
    ref = np.array([[1.0, 100.0], [-1.0, 100.0]])
    est = ref + np.array([[0.1, 1.0], [0.0, 0.0]])
    med, mx = bp.relative_error(est, ref)
    assert mx == pytest.approx(0.1) and med == pytest.approx(0.005)
