"""Leaves without a variance partner under the natural gradient (trainer).

The natural gradient preconditions each weight mean by its variance, so its
rate is orders of magnitude above SGD's (2000 for CIFAR-100).  A
normalisation-free ResNet also has residual gains with no variance: before,
they got plain SGD at that rate and the Table-1 ``bp_nf_ng`` row blew up
within ten steps.  Now they keep the recipe's rate (``optimizer.ng_other_lr``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
import pytest

from dualflow.io import read_jsonl
from dualflow.optim import natural_gradient
from dualflow.train import train_and_evaluate
from dualflow.train.config import apply_method_row, base_config, image_recipe
from dualflow.train.trainer import make_optimizer


def test_method_row_keeps_the_recipe_rate_for_unpaired_leaves():
    c = image_recipe(
        "cifar100",
        "wrn28_10",
        batch_size=128,
        num_epochs=1,
        weight_decay=5e-4,
        warmup_steps=0,
        kl_anneal_steps=0,
    )
    ng = apply_method_row(c, "bp_nf_ng", ng_lr=2000.0)
    assert (ng.optimizer.lr, ng.optimizer.ng_other_lr) == (2000.0, 0.1)
    plain = apply_method_row(c, "bp_nf", ng_lr=2000.0)
    assert (plain.optimizer.lr, plain.optimizer.ng_other_lr) == (0.1, 0.0)


def _sgd_config(other_lr: float):
    c = base_config()
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.0
    c.optimizer.lr = 1000.0
    c.optimizer.natural_gradient = True
    c.optimizer.ng_other_lr = other_lr
    return c


@pytest.mark.parametrize("other_lr, expected_gain_lr", [(0.1, 0.1), (0.0, 1000.0)])
def test_pairs_get_the_natural_gradient_and_other_leaves_their_own_rate(
    other_lr, expected_gain_lr
):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w_mean": jax.random.normal(k[0], (3, 2)),
        "w_logvar": jnp.full((3, 2), -6.0),
        "gain": jnp.zeros(()),
    }
    grads = {
        "w_mean": jax.random.normal(k[1], (3, 2)),
        "w_logvar": jax.random.normal(k[2], (3, 2)),
        "gain": jnp.asarray(0.7),
    }
    schedule = optax.constant_schedule(1000.0)
    tx = make_optimizer(_sgd_config(other_lr), schedule)
    updates, _ = tx.update(grads, tx.init(params), params)

    pair = {key: params[key] for key in ("w_mean", "w_logvar")}
    pair_grads = {key: grads[key] for key in ("w_mean", "w_logvar")}
    reference = optax.chain(natural_gradient(), optax.sgd(1000.0))
    expected, _ = reference.update(pair_grads, reference.init(pair), pair)
    for key in pair:
        assert jnp.allclose(updates[key], expected[key], rtol=1e-6, atol=0)
    assert jnp.allclose(updates["gain"], -expected_gain_lr * 0.7, rtol=1e-6)


def _tiny_wrn_bp_nf_ng(other_lr: float | None):
    """The CIFAR-100 recipe's bp_nf_ng row on a WRN-10-1 and 1437 digits; the
    natural-gradient rate scaled from CIFAR's 50 000 images (2000 -> 57.5)."""
    c = image_recipe(
        "sklearn_digits",
        "wrn",
        batch_size=64,
        num_epochs=1,
        weight_decay=5e-4,
        warmup_steps=10,
        kl_anneal_steps=10,
        crop_pad=1,
        paper_augment=False,
    )
    c = apply_method_row(c, "bp_nf_ng", ng_lr=2000.0 * 1437 / 50_000)
    if other_lr is not None:
        c.optimizer.ng_other_lr = other_lr
    c.model.kwargs.depth, c.model.kwargs.width = 10, 1
    c.data.normalize = "unit"
    c.data.max_test = 40
    c.train.num_steps = 10
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batch_size = 40
    c.train.progress = False
    c.train.plot = False
    c.mesh.num_devices = 1
    return c


def _losses(workdir) -> list[float]:
    return [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def test_tiny_wrn_with_the_recipe_rates_stays_bounded(tmp_path):
    """Measured: the logged loss stays near 60-180 (the KL annealing in);
    with the gains at the natural-gradient rate it reached 4.9e12 by step 10."""
    train_and_evaluate(_tiny_wrn_bp_nf_ng(None), tmp_path / "fixed")
    losses = _losses(tmp_path / "fixed")
    assert len(losses) == 2 and max(losses) < 1e3, losses


def test_tiny_wrn_with_the_gains_at_the_natural_gradient_rate_blows_up(tmp_path):
    """The same run with ``ng_other_lr = optimizer.lr`` (the old behaviour)."""
    cfg = _tiny_wrn_bp_nf_ng(2000.0 * 1437 / 50_000)
    try:
        train_and_evaluate(cfg, tmp_path / "old")
    except FloatingPointError:
        return  # diverged outright: the point is made
    losses = _losses(tmp_path / "old")
    assert max(losses) > 1e6 or not all(map(math.isfinite, losses)), losses
