"""``dualflow.optim.variational_online_newton``: a step that does not grow with n.

Bayesian linear regression ``y = x w + e``, ``e ~ N(0, NOISE)``, prior
``w ~ N(0, PRIOR I)``, with the model written with ``dualflow.moments.dense``
(point inputs, mean-field weights, ``backward="bp"``) and the loss BP trains:
``mean_i -log N(y_i; x_i m, x_i^2 v + NOISE) + KL(q || p) / n``.

Exact answers: ``Lambda = X^T X / NOISE + I / PRIOR``; the posterior mean
``Lambda^{-1} X^T y / NOISE`` (which is also the mean-field variational mean)
and the mean-field variational variances ``1 / Lambda_jj``.  The optimiser's
fixed point with BP's predictive loss is ``1 / v_j = sum_i x_ij^2 /
(NOISE + sum_k x_ik^2 v_k) + 1 / PRIOR`` (module doc of ``dualflow.optim.von``);
it differs from ``1 / Lambda_jj`` by ``O(d / n)`` (computed below: 7% at
n = 100, 0.07% at n = 10^4).

Tolerances (derived, then checked against the measured errors in the
comments):

* mean: after ``T`` steps of ``B`` rows with a cosine-decayed step, the
  iterate has used ``T B`` rows' worth of information, so its error is about
  ``sd_j sqrt(n / (T B))`` (``sd_j`` the exact posterior sd) when ``T B <~ n``
  and below it after several epochs; the bound is ``4 sd_j max(sqrt(n / (T
  B)), 0.1)`` (the floor for the residual stochastic error at the end of the
  schedule).  Measured: <= 0.04 sd (n = 100), <= 0.001 sd (n = 10^4), 0.2-0.7
  sd (n = 10^6; bound 2 sd).  With a constant step ``lr`` instead, the
  iterate keeps a noise of about ``sqrt(lr n / (2 B))`` posterior sds (7 at
  n = 10^6: measured up to 10 sd) -- finite, but use a decaying schedule to
  resolve the posterior mean when ``n >> B``;
* variance: ``h`` is an exponential average with ``b2 = 0.999`` of a curvature
  sample with coefficient of variation ~ sqrt(2) (a chi-square(1) term from
  the squared gradient difference), so its relative sd is ``sqrt(2 (1 - b2) /
  (1 + b2)) ~ 3%``; 5 sd = 15% around the fixed point, plus the fixed point's
  own ``O(d/n)`` distance from ``1 / Lambda_jj``.  Measured ``v / v_fp - 1``:
  -2.5..+6.8% (n = 100; ``v / v_mf - 1`` up to 14.7%, of which 7% is the fixed
  point's), -0.1..+3.4% (n = 10^4), -3.0..-2.1% (n = 10^6).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualflow.moments import dense
from dualflow.objectives import gaussian_nll, kl_mean_field
from dualflow.optim import (
    mean_variance_labels,
    natural_gradient,
    variational_online_newton,
)

D, NOISE, PRIOR = 4, 0.25, 1.0
STEPS = 4000
LR = 0.1  # the transform's default step, for every n


@functools.lru_cache(maxsize=1)
def _problem(n: int, seed: int = 0):
    """Correlated design, targets, and the exact answers (float64)."""
    rng = np.random.default_rng(seed)
    mix = np.array(
        [[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0.5, 2.0, 0], [0.3, 0, 0, 0.5]]
    )
    x = (rng.standard_normal((n, D)) @ mix).astype(np.float32)
    w = rng.standard_normal(D)
    y = (x @ w + math.sqrt(NOISE) * rng.standard_normal(n)).astype(np.float32)
    xd = x.astype(np.float64)
    lam = xd.T @ xd / NOISE + np.eye(D) / PRIOR
    mean = np.linalg.solve(lam, xd.T @ y.astype(np.float64) / NOISE)
    sd = np.sqrt(np.diag(np.linalg.inv(lam)))
    v_mf = 1.0 / np.diag(lam)
    # fixed point of the update with BP's predictive loss (module doc)
    v_fp = v_mf.copy()
    x2 = xd**2
    for _ in range(20):  # a contraction with factor O(d/n)
        v_fp = 1.0 / ((x2 / (NOISE + x2 @ v_fp)[:, None]).sum(0) + 1.0 / PRIOR)
    return x, y, mean, sd, v_mf, v_fp


def _loss(params, x, y, n):
    v = jnp.exp(params["w_logvar"])
    pred = dense(x, params["w_mean"], v)  # point inputs, backward="bp"
    nll = gaussian_nll(pred, y[:, None], NOISE).mean()
    kl = kl_mean_field(params["w_mean"], v, 0.0, PRIOR, q_logvar=params["w_logvar"])
    return nll + kl / n


def _fit(n: int, tx, batch: int, x, y, steps: int = STEPS):
    """``steps`` mini-batches of consecutive permutations (as make_scan_fit)."""
    rng = np.random.default_rng(1)
    epochs = -(-steps * batch // n)
    idx = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    idx = jnp.asarray(idx[: steps * batch].reshape(steps, batch), jnp.int32)
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = {"w_mean": jnp.zeros((D, 1)), "w_logvar": jnp.full((D, 1), -3.0)}

    def step(carry, ix):
        p, st = carry
        loss, g = jax.value_and_grad(_loss)(p, x[ix], y[ix], n)
        u, st = tx.update(g, st, p)
        return (optax.apply_updates(p, u), st), loss

    run = jax.jit(lambda c: jax.lax.scan(step, c, idx))
    (params, _), losses = run((params, tx.init(params)))
    mean = np.asarray(params["w_mean"][:, 0], np.float64)
    var = np.exp(np.asarray(params["w_logvar"][:, 0], np.float64))
    return mean, var, np.asarray(losses)


def _batch(n: int) -> int:
    return min(1000, n // 10)


@pytest.mark.parametrize("n", [100, 10_000, 1_000_000])
def test_converges_on_bayesian_linear_regression_without_tuning(n):
    x, y, mean, sd, v_mf, v_fp = _problem(n)
    b = _batch(n)
    tx = variational_online_newton(
        n, optax.cosine_decay_schedule(LR, STEPS), batch_size=b
    )
    m, v, losses = _fit(n, tx, b, x, y)
    assert np.all(np.isfinite(losses))
    mean_tol = 4.0 * max(math.sqrt(n / (STEPS * b)), 0.1)
    err = np.abs(m - mean) / sd
    assert np.all(err < mean_tol), (err, mean_tol)
    assert np.all(np.abs(v / v_fp - 1) < 0.15), v / v_fp
    model_gap = np.abs(v_fp / v_mf - 1)
    assert np.all(model_gap < 2.0 * D / n), model_gap  # O(d/n), measured 7% at 100
    assert np.all(np.abs(v / v_mf - 1) < 0.15 + model_gap), v / v_mf


def test_old_natural_gradient_rule_diverges_at_a_million_rows():
    """UCI's ``bp_ng`` rule, ``lr = rho n`` (rho = 0.01), same data and batches:
    the loss went from 3.5 to ~3e7 (measured); the new rule stays at ~0.75."""
    n = 1_000_000
    x, y, *_ = _problem(n)
    rho = 0.01
    tx = optax.chain(
        natural_gradient(variance_update="fixed_point", fixed_point_lr=rho * n),
        optax.sgd(rho * n),
    )
    _, _, losses = _fit(n, tx, _batch(n), x, y, steps=200)
    assert not np.all(np.isfinite(losses)) or np.nanmax(losses) > 1e3 * losses[0]


def test_variance_parameterisations_agree_and_precision_stays_positive():
    """``_logvar``/``_rho``/``_var`` leaves get the same variance; a curvature
    sample far below zero at most halves the precision (Riemannian term)."""
    key = jax.random.split(jax.random.key(0), 3)
    m = jax.random.normal(key[0], (5,))
    g_m = jax.random.normal(key[1], (5,))
    g_v = -1e4 * jnp.abs(jax.random.normal(key[2], (5,)))  # very negative
    v0 = jnp.full((5,), 0.01)
    results = []
    for kind, x0, dvdx in (
        ("var", v0, jnp.ones(5)),
        ("logvar", jnp.log(v0), v0),
        ("rho", jnp.log(jnp.expm1(jnp.sqrt(v0))), None),
    ):
        if dvdx is None:
            s = jnp.sqrt(v0)
            dvdx = 2 * s * jax.nn.sigmoid(x0)
        params = {"w_mean": m, f"w_{kind}": x0}
        grads = {"w_mean": g_m, f"w_{kind}": g_v * dvdx}
        tx = variational_online_newton(100, batch_size=10, init_hessian=2.0)
        u, st = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, u)
        if kind == "var":
            var = new["w_var"]
        elif kind == "logvar":
            var = jnp.exp(new["w_logvar"])
        else:
            var = jax.nn.softplus(new["w_rho"]) ** 2
        assert np.all(np.asarray(st.hessian[0]) >= 1.0)  # >= h0 / 2
        results.append((np.asarray(new["w_mean"]), np.asarray(var)))
    for mean, var in results[1:]:
        np.testing.assert_allclose(mean, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(var, results[0][1], rtol=1e-4)
    # v = 1 / (lambda h): lambda = n = 100
    np.testing.assert_allclose(
        results[0][1], 1.0 / (100 * np.asarray(st.hessian[0])), rtol=1e-5
    )


def test_arguments_and_unpaired_leaves_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        variational_online_newton(100)  # predictive needs the batch size
    with pytest.raises(ValueError, match="batch_size"):
        variational_online_newton(100, batch_size=100)
    with pytest.raises(ValueError, match="likelihood"):
        variational_online_newton(100, likelihood="elbo")
    with pytest.raises(ValueError, match="b2"):
        variational_online_newton(100, batch_size=10, b2=1.0)
    variational_online_newton(100, likelihood="expected")  # no batch size needed
    params = {"w_mean": jnp.zeros(3), "w_logvar": jnp.zeros(3), "noise": jnp.zeros(())}
    with pytest.raises(ValueError, match="optax.partition"):
        variational_online_newton(100, batch_size=10).init(params)
    tx = variational_online_newton(100, batch_size=10, unpaired="zero")
    grads = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(grads, tx.init(params), params)
    assert float(u["noise"]) == 0.0
    labels = mean_variance_labels(params)
    assert labels["noise"] == "other"


# ----------------------------------------------------------------------------
# trainer config
# ----------------------------------------------------------------------------


def _von_config():
    from dualflow.train.config import base_config

    c = base_config()
    c.optimizer.name = "von"
    c.optimizer.lr = 0.1
    c.optimizer.ng_other_lr = 1e-3
    c.train.batch_size = 16
    return c


def test_config_validation_names_the_field():
    from dualflow.train.config import ConfigError, validate_config

    for field, value, match in (
        ("optimizer.natural_gradient", True, "natural_gradient"),
        ("optimizer.weight_decay", 1e-4, "weight_decay"),
        ("optimizer.grad_clip", 1.0, "grad_clip"),
        ("optimizer.von_b2", 1.0, "von_b2"),
        ("optimizer.von_likelihood", "elbo", "von_likelihood"),
        ("optimizer.von_init_hessian", 0.0, "von_init_hessian"),
        ("loss.kl_weight", 0.0, "kl_weight"),
        ("optimizer.ng_other_lr", 0.0, "ng_other_lr"),
        ("method.name", "deterministic", "Bayesian"),
    ):
        c = _von_config()
        section, key = field.split(".")
        c[section][key] = value
        with pytest.raises(ConfigError, match=match):
            validate_config(c)
    c = _von_config()
    c.method.name = "reparam"
    c.optimizer.von_likelihood = "predictive"
    with pytest.raises(ConfigError, match="expected"):
        validate_config(c)
    validate_config(_von_config())


def test_trainer_optimizer_from_config_takes_finite_steps_on_a_bp_model():
    from dualflow.nn.context import Method
    from dualflow.nn.methods import Likelihood, objective
    from dualflow.nn.models import Regressor
    from dualflow.train.config import ConfigError
    from dualflow.train.trainer import make_optimizer

    c = _von_config()
    schedule = optax.constant_schedule(c.optimizer.lr)
    with pytest.raises(ConfigError, match="training-set size"):
        make_optimizer(c, schedule)
    n = 200
    tx = make_optimizer(c, schedule, n_data=n)
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, 3))
    y = jnp.sin(x[:, :1]) + 0.1 * jax.random.normal(ky, (n, 1))
    model = Regressor(3, (8,), 1, noise_var=0.1, rngs=nnx.Rngs(params=0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels = mean_variance_labels(nnx.to_pure_dict(params))
    assert "variance" in jax.tree.leaves(labels)
    assert "other" in jax.tree.leaves(labels)  # the noise variance -> Adam
    method, lik = Method("bp"), Likelihood("gaussian")

    def loss_fn(p, xb, yb):
        m = nnx.merge(graphdef, p, rest)
        return objective(m, xb, yb, method=method, likelihood=lik, n_data=n)[0]

    @jax.jit
    def step(p, st, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st, loss

    st = tx.init(params)
    losses = []
    for t in range(12):
        sl = slice((t * 16) % n, (t * 16) % n + 16)
        params, st, loss = step(params, st, x[sl], y[sl])
        losses.append(float(loss))
    assert all(map(math.isfinite, losses)), losses
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))


def test_uci_method_bp_von_builds_and_trains_finitely():
    """``bp_von`` in the UCI benchmark: its spec and optimiser, a few epochs of
    ``make_scan_fit`` on synthetic data (the noise variance goes to Adam)."""
    from dualflow.benchmarks import uci
    from dualflow.nn.methods import Likelihood
    from dualflow.train.scan import make_scan_fit

    assert "bp_von" in uci.UCI_METHODS
    cfg = uci.default_config()
    spec = uci.method_spec("bp_von", cfg)
    assert spec.von and spec.method.name == "bp"
    n, d = 64, 3
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, d))
    y = jnp.sin(x[:, :1]) + 0.1 * jax.random.normal(ky, (n, 1))
    factory = uci._factory(spec, cfg, d, 8)
    graphdef, params, rest = nnx.split(factory(jax.random.key(1)), nnx.Param, ...)
    run = make_scan_fit(
        graphdef,
        uci._optimizer(spec, cfg, n),
        method=spec.method,
        likelihood=Likelihood("gaussian"),
        n_data=n,
        batch_size=16,
        epochs=5,
    )
    params, _, hist = jax.jit(run)(params, rest, x, y, jax.random.key(2))
    assert np.all(np.isfinite(np.asarray(hist["loss"])))
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
