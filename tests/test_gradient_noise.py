"""The gradient-noise decomposition against exact finite-population variances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualflow.benchmarks.gradient_noise import (
    estimate_gradient_noise,
    minibatch_variance_exact,
    model_summary_fn,
    noise_from_batch_summaries,
    paired_difference_se,
)
from dualflow.nn import MLP, Method


def _synthetic_summary(z: np.ndarray, sigma: float):
    """g(B, eps) = mean_{i in B} z_i + sigma * eps: known noise of both kinds."""
    zj = jnp.asarray(z)

    @jax.jit
    def summary(idx, keys):
        def one(k):
            return zj[idx].mean(0) + sigma * jax.random.normal(k, (zj.shape[1],))

        gs = jax.vmap(one)(keys)
        m = gs.mean(0)
        return m, ((gs - m) ** 2).sum() / (gs.shape[0] - 1)

    return summary


@pytest.mark.parametrize("batch_size", [4, 64, 200])
def test_synthetic_decomposition_matches_truth(batch_size):
    rng = np.random.default_rng(0)
    n, p, sigma = 256, 40, 0.3
    z = rng.normal(size=(n, p)) * rng.uniform(0.5, 2.0, size=p)
    est = estimate_gradient_noise(
        _synthetic_summary(z, sigma),
        n,
        batch_size=batch_size,
        num_batches=400,
        num_samples=4,
        key=jax.random.key(1),
    )
    mb = minibatch_variance_exact(z, batch_size)
    wt = p * sigma**2
    assert abs(est.minibatch - mb) < 4 * est.minibatch_se, (est, mb)
    assert abs(est.weight - wt) < 4 * est.weight_se, (est, wt)
    assert abs(est.total - (mb + wt)) < 4 * est.total_se
    # the errors are not vacuous.  The mini-batch part is what remains after
    # removing weight / S, so its error scales with the larger of the two.
    assert est.minibatch_se < 0.15 * max(mb, wt / 4) and est.weight_se < 0.05 * wt


def test_bootstrap_se_matches_spread_over_repeats():
    rng = np.random.default_rng(3)
    n, p, r, s = 100, 10, 40, 3
    z = rng.normal(size=(n, p))
    summary = _synthetic_summary(z, 0.5)
    ests = [
        estimate_gradient_noise(
            summary,
            n,
            batch_size=8,
            num_batches=r,
            num_samples=s,
            key=jax.random.key(k),
            seed=k,
        )
        for k in range(60)
    ]
    spread = np.std([e.minibatch for e in ests], ddof=1)
    se = np.mean([e.minibatch_se for e in ests])
    # the std of a std estimate from 60 repeats is ~9%: allow 35%
    assert 0.65 < se / spread < 1.35, (se, spread)


def test_finite_population_formula_by_enumeration():
    # every 2-subset of 5 vectors: the exact variance of their means
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3))
    import itertools

    means = np.array([z[list(c)].mean(0) for c in itertools.combinations(range(5), 2)])
    exact = ((means - means.mean(0)) ** 2).sum(1).mean()
    assert minibatch_variance_exact(z, 2) == pytest.approx(exact, rel=1e-12)
    assert minibatch_variance_exact(z, 5) == 0.0


def test_summaries_validation():
    with pytest.raises(ValueError, match="num_samples"):
        noise_from_batch_summaries(np.zeros((3, 2)), np.zeros(3), 1)
    with pytest.raises(ValueError, match="\\[R, P\\]"):
        noise_from_batch_summaries(np.zeros((3, 2)), np.zeros(4), 2)


@pytest.fixture(scope="module")
def small_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    model = MLP((6, 12, 2), rngs=nnx.Rngs(0), init_var=0.3)
    return model, x, y


@pytest.mark.parametrize("name", ["bp", "deterministic"])
def test_model_minibatch_noise_is_exact_and_weight_noise_zero(small_problem, name):
    model, x, y = small_problem
    n = len(x)
    summary = model_summary_fn(model, x, y, method=Method(name))
    keys = jax.random.split(jax.random.key(0), 2)
    # per-example gradients of the same objective (KL part is common to all)
    per_ex = np.stack(
        [np.asarray(summary(np.array([i], np.int32), keys)[0]) for i in range(n)]
    )
    batch = 16
    est = estimate_gradient_noise(
        summary,
        n,
        batch_size=batch,
        num_batches=300,
        num_samples=2,
        key=jax.random.key(2),
    )
    assert est.weight == 0.0 and est.weight_se == 0.0
    exact = minibatch_variance_exact(per_ex, batch)
    assert abs(est.minibatch - exact) < 4 * est.minibatch_se, (est, exact)
    assert est.minibatch_se < 0.2 * exact


def test_weight_noise_scaling_with_batch_size(small_problem):
    """Local reparameterisation draws independent noise per example, so its
    weight-noise trace falls as exactly 1/B in expectation over batches;
    reparameterisation shares one weight draw, so it falls much more slowly."""
    model, x, y = small_problem
    n = len(x)
    ratios = {}
    for name in ("local_reparam", "reparam"):
        summary = model_summary_fn(model, x, y, method=Method(name))
        est = {
            b: estimate_gradient_noise(
                summary,
                n,
                batch_size=b,
                num_batches=200,
                num_samples=4,
                key=jax.random.key(b),
                seed=b,
            )
            for b in (4, 32)
        }
        assert est[4].weight > 0 and est[32].weight > 0
        ratio = est[4].weight / est[32].weight
        # delta-method standard error of a ratio of independent estimates
        rel = np.hypot(
            est[4].weight_se / est[4].weight, est[32].weight_se / est[32].weight
        )
        ratios[name] = (ratio, ratio * rel)
    lr, lr_se = ratios["local_reparam"]
    assert abs(lr - 8.0) < 4 * lr_se, ratios
    r, r_se = ratios["reparam"]
    assert r < 8.0 - 4 * r_se, ratios


def test_paired_difference_error():
    """Two estimators on the same batches: the paired error of the difference
    covers the true difference and is far below the unpaired one."""
    rng = np.random.default_rng(5)
    n, p = 200, 30
    z = rng.normal(size=(n, p))
    shift = 1.05  # b's gradient is a's scaled: true variance ratio 1.05^2
    kw = dict(batch_size=16, num_batches=300, num_samples=2, seed=3)
    a = estimate_gradient_noise(
        _synthetic_summary(z, 0.0), n, key=jax.random.key(0), **kw
    )
    b = estimate_gradient_noise(
        _synthetic_summary(shift * z, 0.0), n, key=jax.random.key(0), **kw
    )
    se = paired_difference_se(b, a)
    truth = (shift**2 - 1) * minibatch_variance_exact(z, 16)
    assert abs((b.total - a.total) - truth) < 4 * se
    assert se < 0.2 * np.hypot(a.total_se, b.total_se)
    assert paired_difference_se(a, a) == 0.0
