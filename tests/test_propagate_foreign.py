"""Foreign models (linen, Equinox, plain jnp, a scanned GRU) trained with bp.

Each model is wrapped with ``dualflow.from_*`` and trained end to end by
``fit`` with ``Method("bp")`` (moments forward through ``dualflow.propagate``,
belief-propagation backward).  It is compared with the *same* network
written in dualflow's own layers, started from the same weights (copied in)
and trained with the same optimiser, seed and epochs: the test accuracies
must agree within 1 percentage point, and the closed-form predictive must be
calibrated.

ECE bound: for a perfectly calibrated predictor ``E|sum_{i in b}(correct_i -
conf_i)| <= sqrt(n_b / 4)`` per bin, so by Cauchy-Schwarz over ``B`` bins
``E[ECE] <= sqrt(B / (4 n))`` -- the largest ECE sampling noise alone gives
on ``n`` test points (0.065 for the 899 digits test images, 0.043 for 2000
sequences).  Recipes (Adam with cosine decay, ``kl_weight=0.01``) were chosen
so that the models are not under-trained: shorter runs are under-confident.
"""

import math
import time

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dualflow as df
from dualflow import metrics
from dualflow import nn as dnn
from dualflow.data import load_sklearn_digits
from dualflow.gaussian import Gaussian
from dualflow.nn import Context, Method, ops, predict
from dualflow.train import fit

BP = Method("bp")  # mode "linearized", backward "bp"
NUM_BINS = 15
RESULTS: dict[str, dict] = {}  # filled by the tests, printed with -s


@pytest.fixture(scope="module")
def digits():
    """899 test images: one point of accuracy is 9 images."""
    return load_sklearn_digits(seed=0, test_fraction=0.5)


def _images(data):
    x, y, xt, yt = data
    return x.reshape(-1, 8, 8, 1), y, xt.reshape(-1, 8, 8, 1), yt


def _copy(layer, kernel, bias=None) -> None:
    """Initialise a dualflow Dense/Conv layer's means from foreign weights."""
    layer.kernel_mean[...] = jnp.asarray(kernel)
    if bias is not None:
        layer.bias_mean[...] = jnp.asarray(bias)


@nnx.jit
def _forward(model, x) -> Gaussian:
    return model(x, Context(BP))


def _train_eval(model, data, *, epochs: int, lr: float) -> dict:
    x, y, xt, yt = data
    t0 = time.perf_counter()
    tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * (len(x) // 64)))
    fit(
        model,
        tx,
        x,
        y,
        method=BP,
        epochs=epochs,
        batch_size=64,
        kl_weight=0.01,
        progress=False,
    )
    probs = np.asarray(predict(model, jnp.asarray(xt), method=BP).probs)
    return {
        "acc": float(metrics.accuracy(probs, yt)),
        "nll": float(metrics.nll(probs, yt)),
        "ece": float(metrics.ece(probs, yt, num_bins=NUM_BINS)),
        "seconds": time.perf_counter() - t0,
    }


def _compare(
    name: str, foreign, native, data, *, epochs: int, lr: float, floor: float
) -> None:
    """Same start, same training: accuracy parity and calibration."""
    xt = jnp.asarray(data[2][:64])
    a, b = _forward(foreign, xt), _forward(native, xt)
    assert isinstance(a, Gaussian)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-4, atol=1e-7)
    rf = _train_eval(foreign, data, epochs=epochs, lr=lr)
    rn = _train_eval(native, data, epochs=epochs, lr=lr)
    RESULTS[name] = {"foreign": rf, "dualflow": rn}
    print(f"\n{name}: foreign {rf}\n{' ' * len(name)}  dualflow {rn}")
    assert abs(rf["acc"] - rn["acc"]) <= 0.01, (rf, rn)
    assert rf["acc"] >= floor, rf
    n = len(data[3])
    assert rf["ece"] <= math.sqrt(NUM_BINS / (4 * n)), rf


# --------------------------------------------------------------------------
# (a) flax.linen CNN: conv, relu, max_pool, avg_pool, dense
# --------------------------------------------------------------------------
class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_linen_cnn(digits):
    data = _images(digits)
    variables = LinenCNN().init(jax.random.key(0), data[0][:2])
    p = variables["params"]
    r = nnx.Rngs(0)
    c0, c1 = dnn.Conv(1, 8, 3, rngs=r), dnn.Conv(8, 16, 3, rngs=r)
    d = dnn.Dense(2 * 2 * 16, 10, rngs=r)
    for layer, name in ((c0, "Conv_0"), (c1, "Conv_1"), (d, "Dense_0")):
        _copy(layer, p[name]["kernel"], p[name]["bias"])
    relu = dnn.Activation("relu")
    native = dnn.Sequential(
        c0, relu, dnn.MaxPool(2), c1, relu, dnn.AvgPool(2), dnn.Flatten(), d
    )
    foreign = df.from_linen(LinenCNN(), variables)
    _compare("linen CNN", foreign, native, data, epochs=20, lr=3e-2, floor=0.95)


# --------------------------------------------------------------------------
# (b) flax.linen pre-activation residual block, no normalisation
# --------------------------------------------------------------------------
class LinenResNet(nn.Module):
    width: int = 12

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (3, 3))(x)
        h = nn.Conv(self.width, (3, 3))(nn.relu(x))
        h = nn.Conv(self.width, (3, 3))(nn.relu(h))
        x = nn.relu(x + h)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_linen_resnet(digits):
    data = _images(digits)
    w = LinenResNet.width
    variables = LinenResNet().init(jax.random.key(0), data[0][:2])
    p = variables["params"]
    r = nnx.Rngs(0)
    convs = [dnn.Conv(1 if i == 0 else w, w, 3, rngs=r) for i in range(3)]
    for i, c in enumerate(convs):
        _copy(c, p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"])
    d = dnn.Dense(4 * 4 * w, 10, rngs=r)
    _copy(d, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])
    relu = dnn.Activation("relu")
    block = dnn.Sequential(relu, convs[1], relu, convs[2])
    native = dnn.Sequential(
        convs[0], dnn.Residual(block), relu, dnn.AvgPool(2), dnn.Flatten(), d
    )
    foreign = df.from_linen(LinenResNet(), variables)
    _compare("linen ResNet", foreign, native, data, epochs=20, lr=1e-2, floor=0.95)


# --------------------------------------------------------------------------
# (c) Equinox MLP (weights [out, in], vmapped over the batch)
# --------------------------------------------------------------------------
def test_equinox_mlp(digits):
    mlp = eqx.nn.MLP(64, 10, 64, 2, activation=jax.nn.relu, key=jax.random.key(0))
    native = dnn.MLP((64, 64, 64, 10), activation="relu", rngs=nnx.Rngs(0))
    for layer, lin in zip(native.net.layers[::2], mlp.layers, strict=True):
        _copy(layer, lin.weight.T, lin.bias)
    foreign = df.from_equinox(mlp)
    _compare("Equinox MLP", foreign, native, digits, epochs=20, lr=1e-2, floor=0.95)


# --------------------------------------------------------------------------
# (d) plain jax.numpy tanh MLP
# --------------------------------------------------------------------------
def tanh_mlp(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["bias"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


def test_plain_jnp_mlp(digits):
    sizes = (64, 64, 64, 10)
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "bias": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]
    native = dnn.MLP(sizes, activation="tanh", rngs=nnx.Rngs(0))
    for layer, pr in zip(native.net.layers[::2], params, strict=True):
        _copy(layer, pr["w"], pr["bias"])
    foreign = df.from_function(tanh_mlp, params)
    _compare("jnp tanh MLP", foreign, native, digits, epochs=20, lr=1e-2, floor=0.95)


# --------------------------------------------------------------------------
# (e) linen GRU cell run by nn.RNN (lax.scan): sign of a running sum
# --------------------------------------------------------------------------
STEPS, HIDDEN = 10, 16


def _sequences(n: int, seed: int):
    """``x [n, STEPS, 1]`` standard normal; label: is the sum positive."""
    x = np.random.default_rng(seed).normal(size=(n, STEPS, 1)).astype(np.float32)
    return x, (x.sum((1, 2)) > 0).astype(np.int32)


class LinenGRU(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.RNN(nn.GRUCell(HIDDEN))(x)
        return nn.Dense(2)(h[:, -1])


class NativeGRU(nnx.Module):
    """flax's GRUCell equations in dualflow layers, scanned over time:
    ``r = s(W_ir x + W_hr h)``, ``z = s(W_iz x + W_hz h)``,
    ``n = tanh(W_in x + r * (W_hn h))``, ``h' = (1 - z) n + z h``."""

    def __init__(self, params, rngs: nnx.Rngs):
        g = params["GRUCell_0"]

        def dense(name, d_in, bias):
            layer = dnn.Dense(d_in, HIDDEN, use_bias=bias, rngs=rngs)
            _copy(layer, g[name]["kernel"], g[name]["bias"] if bias else None)
            return layer

        self.ir, self.iz, self.in_ = (dense(n, 1, True) for n in ("ir", "iz", "in"))
        self.hr, self.hz = dense("hr", HIDDEN, False), dense("hz", HIDDEN, False)
        self.hn = dense("hn", HIDDEN, True)
        self.out = dnn.Dense(HIDDEN, 2, rngs=rngs)
        _copy(self.out, params["Dense_0"]["kernel"], params["Dense_0"]["bias"])
        self.sigmoid, self.tanh = dnn.Activation("sigmoid"), dnn.Activation("tanh")

    def __call__(self, x, ctx: Context):
        def step(h, xt):
            r = self.sigmoid(ops.add(ctx, self.ir(xt, ctx), self.hr(h, ctx)), ctx)
            z = self.sigmoid(ops.add(ctx, self.iz(xt, ctx), self.hz(h, ctx)), ctx)
            gated = ops.multiply(ctx, r, self.hn(h, ctx))
            n = self.tanh(ops.add(ctx, self.in_(xt, ctx), gated), ctx)
            keep = Gaussian(1.0 - z.mean, z.var)  # 1 - z: exact
            h = ops.add(ctx, ops.multiply(ctx, keep, n), ops.multiply(ctx, z, h))
            return h, None

        h0 = Gaussian.point(jnp.zeros((x.shape[0], HIDDEN), x.dtype))
        h, _ = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
        return self.out(h, ctx)


def test_linen_gru_scan():
    x, y = _sequences(2000, 0)
    xt, yt = _sequences(2000, 1)  # one point of accuracy is 20 sequences
    variables = LinenGRU().init(jax.random.key(0), x[:2])
    native = NativeGRU(variables["params"], nnx.Rngs(0))
    foreign = df.from_linen(LinenGRU(), variables)
    _compare(
        "linen GRU (scan)",
        foreign,
        native,
        (x, y, xt, yt),
        epochs=5,
        lr=3e-2,
        floor=0.95,
    )
