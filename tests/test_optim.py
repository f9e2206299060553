"""Natural-gradient optimiser for mean-field Gaussian weights (App. D).

Reference values (Kalman posterior, parameter maps) are computed in float64
NumPy; JAX work is jitted once per configuration (eager dispatch is slow).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualflow.optim import mean_variance_labels, natural_gradient

# ----------------------------------------------------------------------------
# Bayesian linear regression: exact marginal likelihood and Kalman posterior
# ----------------------------------------------------------------------------

S2 = 0.4  # observation noise variance


def _blr_problem(d, n=5, seed=0):
    """x [n, d], y [n], prior mean mu [d], diagonal prior variance v [d]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    mu = rng.normal(size=d)
    v = rng.uniform(0.3, 2.0, size=d)
    y = x @ rng.normal(size=d) + np.sqrt(S2) * rng.normal(size=n)
    return x, y, mu, v


def _neg_log_marginal(mean, var, x, y):
    """-log N(y; x mean, x diag(var) x^T + s2 I), with full matrices."""
    n = x.shape[0]
    cov = x @ jnp.diag(var) @ x.T + S2 * jnp.eye(n)
    r = y - x @ mean
    _, logdet = jnp.linalg.slogdet(cov)
    quad = r @ jnp.linalg.solve(cov, r)
    return 0.5 * (quad + logdet + n * jnp.log(2 * jnp.pi))


def _kalman_posterior(mu, v, x, y):
    """Exact posterior N(mean, cov) of w (NumPy, float64)."""
    sigma = np.diag(v)
    gain = sigma @ x.T @ np.linalg.inv(x @ sigma @ x.T + S2 * np.eye(x.shape[0]))
    return mu + gain @ (y - x @ mu), sigma - gain @ x @ sigma


def _to_coord(v, kind):
    if kind == "var":
        return v
    if kind == "logvar":
        return np.log(v)
    s = np.sqrt(v)  # rho = softplus^{-1}(s)
    return s + np.log(-np.expm1(-s))


def _from_coord(p, kind):
    xp = jnp if isinstance(p, jax.Array) else np
    if kind == "var":
        return p
    if kind == "logvar":
        return xp.exp(p)
    return xp.logaddexp(0.0, p) ** 2


def _dv_dcoord(p, kind):
    if kind == "var":
        return np.ones_like(p)
    if kind == "logvar":
        return np.exp(p)
    s = np.logaddexp(0.0, p)
    return 2 * s / (1 + np.exp(-p))


@functools.partial(jax.jit, static_argnames=("kind", "variance_update"))
def _blr_step(mean, coord, x, y, lr, *, kind, variance_update):
    """One ``chain(natural_gradient(...), sgd(lr))`` step on J = -log p(y|x).

    Returns the new parameters and the natural-gradient transform's output.
    """
    params = {"w_mean": mean, f"w_{kind}": coord}

    def loss(p):
        return _neg_log_marginal(p["w_mean"], _from_coord(p[f"w_{kind}"], kind), x, y)

    ng = natural_gradient(variance_update=variance_update)
    tx = optax.chain(ng, optax.sgd(lr))
    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    ng_updates, _ = ng.update(grads, ng.init(params), params)
    new = optax.apply_updates(params, updates)
    return (
        new["w_mean"],
        new[f"w_{kind}"],
        ng_updates["w_mean"],
        ng_updates[f"w_{kind}"],
    )


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("variance_update", ["app_d", "fixed_point"])
def test_lr1_step_lands_on_kalman_posterior(x64, d, variance_update):
    x, y, mu, v = _blr_problem(d)
    new_m, new_v, _, _ = _blr_step(
        mu, v, x, y, 1.0, kind="var", variance_update=variance_update
    )
    post_mean, post_cov = _kalman_posterior(mu, v, x, y)
    post_var = np.diag(post_cov)
    np.testing.assert_allclose(new_m, post_mean, rtol=0, atol=1e-8)
    if variance_update == "fixed_point":
        # exact posterior marginal variance (d = 1: the exact posterior; d > 1:
        # the diagonal of the full posterior covariance).
        target = post_var
    else:
        # App. D: v + 2 v^2 g_v = E_post[(w - mu)^2] = post var + (post mean - mu)^2
        target = post_var + (post_mean - mu) ** 2
    np.testing.assert_allclose(new_v, target, rtol=0, atol=1e-8)
    assert np.all(new_v > 0)


@pytest.mark.parametrize("kind", ["logvar", "rho"])
@pytest.mark.parametrize("variance_update", ["app_d", "fixed_point"])
def test_reparameterised_update_matches_var_update(x64, kind, variance_update):
    """(preconditioned update in x) * dv/dx == the ``_var`` update, exactly."""
    x, y, mu, v = _blr_problem(3)
    coord = _to_coord(v, kind)
    np.testing.assert_allclose(_from_coord(coord, kind), v, rtol=1e-12)
    step = functools.partial(_blr_step, lr=1.0, variance_update=variance_update)
    _, _, um_var, uv_var = step(mu, v, x, y, kind="var")
    _, _, um_x, ux = step(mu, coord, x, y, kind=kind)
    np.testing.assert_allclose(um_x, um_var, rtol=1e-12)
    np.testing.assert_allclose(ux * _dv_dcoord(coord, kind), uv_var, rtol=1e-10)


@pytest.mark.parametrize("kind", ["logvar", "rho"])
def test_small_lr_step_moves_variance_like_var_parameterisation(x64, kind):
    x, y, mu, v = _blr_problem(3)
    coord = _to_coord(v, kind)
    errs = []
    for lr in (1e-3, 1e-4):
        step = functools.partial(_blr_step, lr=lr, variance_update="app_d")
        dv_var = step(mu, v, x, y, kind="var")[1] - v
        dv_x = _from_coord(step(mu, coord, x, y, kind=kind)[1], kind) - v
        assert np.all(np.abs(dv_var) > 0.1 * lr)  # the step is first order in lr
        np.testing.assert_allclose(dv_x, dv_var, rtol=20 * lr)
        errs.append(np.max(np.abs(dv_x - dv_var)))
    # the discrepancy is second order: 10x smaller lr -> ~100x smaller error
    assert errs[1] < errs[0] / 50


def test_fixed_point_is_expectation_parameter_step(x64):
    """Independent check with autodiff through the natural parameters.

    eta = (m, m^2 + v), theta = (m / v, -1 / (2 v)); the fixed-point variant at
    learning rate a (with fixed_point_lr = a) must give eta' = eta - a dJ/dtheta,
    for a generic smooth loss and over several steps with a schedule.
    """
    x, y, mu, v = _blr_problem(3, seed=1)

    def loss_mv(m, var):  # not Gaussian-linear: a generic J
        return _neg_log_marginal(m, var, x, y) + 0.3 * jnp.sum(jnp.sin(m) * var)

    def loss_theta(t1, t2):
        var = -0.5 / t2
        return loss_mv(t1 * var, var)

    grad_mv = jax.jit(jax.grad(loss_mv, argnums=(0, 1)))
    grad_theta = jax.jit(jax.grad(loss_theta, argnums=(0, 1)))
    # 0.5, 0.25, 0.125: exact in float32, so the schedule's dtype does not matter
    sched = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5)
    tx = optax.chain(
        natural_gradient(variance_update="fixed_point", fixed_point_lr=sched),
        optax.sgd(sched),
    )
    update = jax.jit(tx.update)
    params = {"w_mean": jnp.asarray(mu), "w_var": jnp.asarray(v)}
    state = tx.init(params)
    for k in range(3):
        m, var = np.asarray(params["w_mean"]), np.asarray(params["w_var"])
        a = 0.5 ** (k + 1)  # = sched(k)
        gt1, gt2 = grad_theta(m / var, -0.5 / var)
        eta1 = m - a * np.asarray(gt1)
        eta2 = m**2 + var - a * np.asarray(gt2)
        gm, gv = grad_mv(m, var)
        updates, state = update({"w_mean": gm, "w_var": gv}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w_mean"], eta1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            params["w_var"], eta2 - eta1**2, rtol=1e-11, atol=1e-12
        )


# ----------------------------------------------------------------------------
# Fisher, damping, numerics
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="kind")
@functools.partial(jax.vmap, in_axes=(0, 0, None))
def _fisher(m0, x0, kind):
    """Fisher of N(m, v(x)) w.r.t. (m, x): Hessian of KL(q0 || q) at q = q0."""

    def kl(phi):
        v0 = _from_coord(x0, kind)
        v = _from_coord(phi[1], kind)
        return 0.5 * (jnp.log(v / v0) + (v0 + (m0 - phi[0]) ** 2) / v - 1.0)

    return jax.hessian(kl)(jnp.stack([m0, x0]))


@pytest.mark.parametrize("kind", ["var", "logvar", "rho"])
def test_update_is_damped_inverse_fisher_times_gradient(x64, kind):
    coords = {
        "var": [0.05, 1.0, 3.0],
        "logvar": [-3.0, 0.0, 1.2],
        "rho": [-8.0, -1.0, 0.5, 4.0],
    }[kind]
    xs = np.asarray(coords)
    ms = np.linspace(-1.0, 1.0, xs.size)
    gm = np.linspace(0.5, -2.0, xs.size)
    gx = np.linspace(-1.5, 0.8, xs.size)
    fisher = np.asarray(_fisher(jnp.asarray(ms), jnp.asarray(xs), kind))
    np.testing.assert_allclose(fisher[:, 0, 1], 0.0, atol=1e-12)
    params = {"w_mean": jnp.asarray(ms), f"w_{kind}": jnp.asarray(xs)}
    grads = {"w_mean": jnp.asarray(gm), f"w_{kind}": jnp.asarray(gx)}
    for damping in (0.0, 0.7):
        tx = natural_gradient(damping=damping)
        upd, _ = tx.update(grads, tx.init(params), params)
        want = np.linalg.solve(
            fisher + damping * np.eye(2), np.stack([gm, gx], -1)[..., None]
        )[..., 0]
        np.testing.assert_allclose(upd["w_mean"], want[:, 0], rtol=1e-10)
        np.testing.assert_allclose(upd[f"w_{kind}"], want[:, 1], rtol=1e-10)


def test_rho_is_stable_for_very_negative_rho():
    rho = jnp.array([-30.0, -60.0, -100.0, -200.0], jnp.float32)
    params = {"w_mean": jnp.zeros(4), "w_rho": rho}
    grads = {"w_mean": jnp.ones(4), "w_rho": jnp.ones(4)}
    for vu in ("app_d", "fixed_point"):
        tx = natural_gradient(variance_update=vu)
        upd, _ = tx.update(grads, tx.init(params), params)
        assert jnp.all(jnp.isfinite(upd["w_rho"]))
        # F_rhorho -> 2 as rho -> -inf (s ~ sigmoid ~ e^rho): update -> G / 2
        np.testing.assert_allclose(upd["w_rho"], 0.5, rtol=1e-6)


def test_damping_limits():
    v = jnp.array([0.01, 1.0, 50.0])
    g = jnp.array([1.0, -2.0, 3.0])
    params = {"w_mean": jnp.zeros(3), "w_logvar": jnp.log(v)}
    grads = {"w_mean": g, "w_logvar": g}
    for lam in (0.0, 0.5, 1e3):
        tx = natural_gradient(damping=lam)
        upd, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(upd["w_mean"], v / (1 + lam * v) * g, rtol=1e-6)
        np.testing.assert_allclose(upd["w_logvar"], 2 / (1 + 2 * lam) * g, rtol=1e-6)
    # lambda -> inf: lambda * update -> g (plain SGD with lr / lambda)
    lam = 1e7
    tx = natural_gradient(damping=lam)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(lam * upd["w_mean"], g, rtol=1e-4)
    np.testing.assert_allclose(lam * upd["w_logvar"], g, rtol=1e-4)
    # variance_damping overrides damping for variance leaves only
    tx = natural_gradient(damping=1.0, variance_damping=0.0)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["w_mean"], v / (1 + v) * g, rtol=1e-6)
    np.testing.assert_allclose(upd["w_logvar"], 2 * g, rtol=1e-6)


# ----------------------------------------------------------------------------
# Composition with optax / nnx
# ----------------------------------------------------------------------------


def _nested_params():
    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel_mean": 0.3 * rng.normal(size=(3, 2)),
            "kernel_logvar": np.full((3, 2), -2.0),
            "bias_mean": np.zeros(2),
            "bias_rho": np.full(2, -1.0),
        },
        "out": {"w_mean": rng.normal(size=2), "w_var": np.full(2, 0.5)},
        "scale": np.array(1.5),
        "noise_logvar": np.array(0.0),  # lone variance-like leaf: "other"
    }
    # strongly typed float32 (weak types would make jit retrace after step 1)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _nested_loss(params, x, y):
    d = params["dense"]
    h = x @ d["kernel_mean"] + d["bias_mean"]
    hvar = (x**2) @ jnp.exp(d["kernel_logvar"]) + jax.nn.softplus(d["bias_rho"]) ** 2
    h = jnp.tanh(h) * params["scale"]
    o = params["out"]
    mean = h @ o["w_mean"]
    var = (
        (h**2) @ o["w_var"] + jnp.sum(hvar, -1) * 0.1 + jnp.exp(params["noise_logvar"])
    )
    return jnp.mean(0.5 * (y - mean) ** 2 / var + 0.5 * jnp.log(var))


def _data():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=16)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def test_labels_for_nested_dict():
    labels = mean_variance_labels(_nested_params())
    assert labels == {
        "dense": {
            "kernel_mean": "mean",
            "kernel_logvar": "variance",
            "bias_mean": "mean",
            "bias_rho": "variance",
        },
        "out": {"w_mean": "mean", "w_var": "variance"},
        "scale": "other",
        "noise_logvar": "other",
    }


def _check_chain_with_schedule(sched):
    x, y = _data()
    params = _nested_params()
    ng = natural_gradient(damping=1e-4)
    tx = optax.chain(ng, optax.sgd(sched, momentum=0.9, nesterov=True))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(_nested_loss)(p, x, y)
        u, s = tx.update(g, s, p)
        u_ng, _ = ng.update(g, ng.init(p), p)  # the transform alone, for checking
        return optax.apply_updates(p, u), s, loss, u_ng

    # first step, by hand: nesterov sgd applies -lr0 * (1 + 0.9) * u
    p, s, loss0, u0 = step(params, jax.jit(tx.init)(params))
    lr0 = float(sched(0))
    assert lr0 > 0
    expect = jax.tree.map(
        lambda q, u: np.asarray(q) - lr0 * 1.9 * np.asarray(u), params, u0
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, expect
    )
    for _ in range(30):
        p, s, loss, _ = step(p, s)
    assert np.isfinite(loss)
    assert loss < loss0


@pytest.mark.parametrize(
    "sched",
    [
        optax.cosine_decay_schedule(0.05, decay_steps=50),
        optax.warmup_cosine_decay_schedule(0.01, 0.05, 5, 50),
    ],
    ids=["cosine", "warmup_cosine"],
)
def test_chain_with_nesterov_momentum_and_schedules_under_jit(sched):
    _check_chain_with_schedule(sched)


def test_partition_with_mean_variance_labels():
    params = _nested_params()
    rng = np.random.default_rng(3)
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params
    )
    ng = natural_gradient()
    inner = {
        "mean": optax.sgd(1.0),
        "variance": optax.sgd(0.25),
        "other": optax.set_to_zero(),
    }
    txs = [
        optax.chain(natural_gradient(), combine(inner, labels))
        for labels in (mean_variance_labels, mean_variance_labels(params))
        for combine in (optax.partition, optax.multi_transform)
    ]

    @jax.jit  # one compilation for all four variants
    def all_updates(grads, params):
        u_ng, _ = ng.update(grads, ng.init(params), params)
        return u_ng, [tx.update(grads, tx.init(params), params)[0] for tx in txs]

    u_ng, variants = all_updates(grads, params)
    for u in variants:
        d = u["dense"]
        np.testing.assert_allclose(d["kernel_mean"], -u_ng["dense"]["kernel_mean"])
        np.testing.assert_allclose(
            d["kernel_logvar"], -0.25 * u_ng["dense"]["kernel_logvar"]
        )
        np.testing.assert_allclose(d["bias_rho"], -0.25 * u_ng["dense"]["bias_rho"])
        np.testing.assert_allclose(u["out"]["w_var"], -0.25 * u_ng["out"]["w_var"])
        assert float(u["scale"]) == 0.0 and float(u["noise_logvar"]) == 0.0


def test_natural_gradient_inside_a_partition_branch_explains_the_problem():
    params = _nested_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.partition(
        {
            "mean": natural_gradient(),
            "variance": optax.identity(),
            "other": optax.sgd(1),
        },
        mean_variance_labels,
    )
    with pytest.raises(ValueError, match="outside optax.partition"):
        tx.update(grads, tx.init(params), params)


def test_unpaired_leaves():
    params = _nested_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.7), params)
    tx = natural_gradient()
    u, _ = tx.update(grads, tx.init(params), params)
    assert float(u["scale"]) == pytest.approx(0.7)
    assert float(u["noise_logvar"]) == pytest.approx(0.7)  # lone: not preconditioned
    tx = natural_gradient(unpaired="zero")
    u, _ = tx.update(grads, tx.init(params), params)
    assert float(u["scale"]) == 0.0 and float(u["noise_logvar"]) == 0.0
    np.testing.assert_allclose(
        u["dense"]["kernel_mean"], 0.7 * jnp.exp(-2.0) * jnp.ones((3, 2)), rtol=1e-6
    )


class _TinyBayesDense(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.kernel_mean = nnx.Param(
            0.5 * jax.random.normal(rngs.params(), (din, dout))
        )
        f32 = jnp.float32  # strong types: weak ones make jit retrace after step 1
        self.kernel_logvar = nnx.Param(jnp.full((din, dout), -1.0, f32))
        self.bias_mean = nnx.Param(jnp.zeros(dout, f32))
        self.bias_logvar = nnx.Param(jnp.full((dout,), -2.0, f32))
        self.scale = nnx.Param(jnp.array(1.0, f32))

    def __call__(self, x):
        mean = x @ self.kernel_mean[...] + self.bias_mean[...]
        var = (x**2) @ jnp.exp(self.kernel_logvar[...]) + jnp.exp(self.bias_logvar[...])
        return self.scale[...] * mean, var


def _nnx_loss(model, x, y):
    mean, var = model(x)
    var = var + 0.1
    return jnp.mean(0.5 * (y - mean) ** 2 / var + 0.5 * jnp.log(var))


def _flat_arrays(state):
    """{attribute name: NumPy array} for a flat nnx.State."""
    return {k[0]: np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("use_jit", [False, True])
def test_nnx_optimizer(use_jit):
    x, _ = _data()
    y = jnp.stack([x[:, 0] - x[:, 1], 0.5 * x[:, 2]], -1)
    model = _TinyBayesDense(3, 2, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    # nnx.State paths end in GetAttrKey('value'); pairing must see through it
    labels = {
        path[0].key: lab
        for path, lab in jax.tree_util.tree_flatten_with_path(
            mean_variance_labels(state)
        )[0]
    }
    assert labels == {
        "kernel_mean": "mean",
        "kernel_logvar": "variance",
        "bias_mean": "mean",
        "bias_logvar": "variance",
        "scale": "other",
    }

    lr = 0.1
    opt = nnx.Optimizer(
        model, optax.chain(natural_gradient(), optax.sgd(lr)), wrt=nnx.Param
    )
    before = _flat_arrays(state)

    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
        opt.update(model, grads)
        return loss, grads

    step = nnx.jit(train_step) if use_jit else train_step
    loss0, grads = step(model, opt)
    g = _flat_arrays(grads)
    after = _flat_arrays(nnx.state(model, nnx.Param))
    for base in ("kernel", "bias"):
        m, u = f"{base}_mean", f"{base}_logvar"
        v = np.exp(before[u])
        np.testing.assert_allclose(
            after[m], before[m] - lr * v * g[m], rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            after[u], before[u] - lr * 2 * g[u], rtol=1e-5, atol=1e-7
        )
    # the unpaired leaf gets plain SGD
    np.testing.assert_allclose(
        after["scale"], before["scale"] - lr * g["scale"], rtol=1e-6
    )
    if use_jit:
        for _ in range(20):
            loss, _ = step(model, opt)
        assert loss < loss0


@pytest.mark.parametrize("labels", ["function", "as_pure"])
def test_nnx_optimizer_with_partition(labels):
    x, _ = _data()
    y = jnp.stack([x[:, 0], x[:, 1]], -1)
    model = _TinyBayesDense(3, 2, nnx.Rngs(0))
    if labels == "function":
        labels = mean_variance_labels  # called on the tree optax sees
    else:  # nnx.Optimizer hands optax pure (Variable-free) trees
        labels = mean_variance_labels(nnx.as_pure(nnx.state(model, nnx.Param)))
    inner = {
        "mean": optax.sgd(0.1),
        "variance": optax.sgd(0.01),
        "other": optax.set_to_zero(),
    }
    tx = optax.chain(natural_gradient(), optax.partition(inner, labels))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = _flat_arrays(nnx.state(model, nnx.Param))
    g = _flat_arrays(nnx.grad(_nnx_loss)(model, x, y))
    opt.update(model, nnx.grad(_nnx_loss)(model, x, y))
    after = _flat_arrays(nnx.state(model, nnx.Param))
    m, u = "kernel_mean", "kernel_logvar"
    v = np.exp(before[u])
    np.testing.assert_allclose(after[m], before[m] - 0.1 * v * g[m], rtol=1e-5)
    np.testing.assert_allclose(after[u], before[u] - 0.01 * 2 * g[u], rtol=1e-5)
    assert after["scale"] == before["scale"]


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_errors():
    g = jnp.ones(3)
    with pytest.raises(ValueError, match=r"has no variance partner.*w_logvar"):
        natural_gradient().init({"layer": {"w_mean": g, "b_logvar": g}})
    with pytest.raises(ValueError, match=r"shape mismatch.*same shape"):
        natural_gradient().init({"w_mean": g, "w_logvar": jnp.ones(4)})
    with pytest.raises(ValueError, match="several variance partners"):
        natural_gradient().init({"w_mean": g, "w_logvar": g, "w_var": g})
    with pytest.raises(ValueError, match="has no variance partner"):
        mean_variance_labels({"w_mean": g})
    tx = natural_gradient()
    params = {"w_mean": g, "w_var": g}
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="different tree structures"):
        tx.update({"w_mean": g, "w_var": g, "x": g}, tx.init(params), params)
    with pytest.raises(ValueError, match="variance_update"):
        natural_gradient(variance_update="adam")
    with pytest.raises(ValueError, match="unpaired"):
        natural_gradient(unpaired="drop")
    with pytest.raises(ValueError, match=">= 0"):
        natural_gradient(damping=-1.0)
    # pairing is per parent path: same base names in different subtrees are fine
    p = {"a": {"w_mean": g, "w_var": g}, "b": {"w_mean": g, "w_rho": g}}
    assert mean_variance_labels(p)["b"]["w_rho"] == "variance"
    with pytest.raises(ValueError, match=r"\['b'\]\['w_mean'\]"):
        mean_variance_labels({"a": {"w_var": g}, "b": {"w_mean": g}})
