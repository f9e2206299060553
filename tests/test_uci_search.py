"""Per-data-set hyper-parameter search of the UCI benchmark
(dualflow/benchmarks/uci_search.py): selection on validation rows only,
recorded choices, the heteroscedastic bp predictive, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualflow import nn as dnn
from dualflow.benchmarks import uci as uci_bench
from dualflow.benchmarks.uci_search import (
    Candidate,
    candidates,
    heteroscedastic_bp_log_likelihood,
    run_search_group,
    search_methods,
    select,
    select_group,
)
from dualflow.data.uci import load_uci
from dualflow.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _write_uci(root: Path, name: str = "yacht", n: int = 60, d: int = 3, splits=2):
    """A small synthetic data set in the UCI layout (a noisy linear target)."""
    rng = np.random.default_rng(0)
    folder = root / "uci" / name
    folder.mkdir(parents=True)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    np.savetxt(folder / "data.txt", np.c_[x, y])
    (folder / "index_features.txt").write_text("\n".join(map(str, range(d))) + "\n")
    (folder / "index_target.txt").write_text(f"{d}\n")
    (folder / "n_splits.txt").write_text(f"{splits}\n")
    (folder / "n_hidden.txt").write_text("5\n")
    (folder / "n_epochs.txt").write_text("3\n")
    for k in range(splits):
        perm = rng.permutation(n)
        np.savetxt(folder / f"index_train_{k}.txt", perm[: n - 8], fmt="%d")
        np.savetxt(folder / f"index_test_{k}.txt", perm[n - 8 :], fmt="%d")


def _tiny(budget: int = 3):
    cfg = uci_bench.default_config()
    cfg.max_steps, cfg.eval_points, cfg.batch_size = 24, 3, 16
    cfg.val_samples, cfg.test_samples, cfg.ensemble_size = 2, 4, 2
    cfg.search_budget = budget
    return cfg


# ------------------------------------------------------------------ selection
def test_select_picks_the_best_validation_ll_per_split(monkeypatch):
    """val_ll [candidates, splits, evaluation points]: the arg-max over
    (candidate, point) per split; non-finite values never win (no smoothing
    here, see the next test)."""
    from dualflow.benchmarks import uci_search

    monkeypatch.setattr(uci_search, "SMOOTH", 1)
    val = np.full((3, 2, 4), -5.0)
    val[1, 0, 2] = -1.0  # split 0: candidate 1 at point 2
    val[2, 0, 3] = np.nan  # a diverged run never wins
    val[2, 1, 0] = -2.0  # split 1: candidate 2 at point 0
    val[0, 1, 1] = np.inf  # not finite either
    cand, point, best = select(val)
    np.testing.assert_array_equal(cand, [1, 2])
    np.testing.assert_array_equal(point, [2, 0])
    np.testing.assert_array_equal(best, [-1.0, -2.0])
    cand, _, best = select(np.full((2, 1, 3), np.nan))
    assert best[0] == -np.inf


def test_select_prefers_stable_plateaus_to_lucky_or_unstable_points():
    """A lone lucky point (candidate 0) loses to a plateau (candidate 1) once
    points are averaged over SMOOTH; the best curve of split 1 (candidate 1)
    went NaN later, so the stable candidate 2 is taken there."""
    from dualflow.benchmarks.uci_search import SMOOTH

    assert SMOOTH == 3
    val = np.full((3, 2, 6), -5.0)
    val[0, 0, 3] = -1.0  # lucky: trailing mean (-5 -5 -1)/3 = -3.67
    val[1, 0, 2:5] = -2.5  # plateau: -2.5
    val[1, 1, :3] = -1.0
    val[1, 1, 5] = np.nan  # blows up at the end
    val[2, 1, :] = -3.0
    cand, point, best = select(val)
    np.testing.assert_array_equal(cand, [1, 2])
    assert point[0] == 4 and best[0] == -2.5
    assert best[1] == -3.0
    # when every candidate went non-finite somewhere, the best finite mean wins
    val[2, 1, 0] = val[0, 1, 0] = np.nan
    assert select(val)[0][1] == 1


def test_every_method_gets_the_same_budget_starting_with_the_config():
    cfg = _tiny()
    methods = search_methods()
    assert set(uci_bench.UCI_METHODS) < set(methods) and "bp_het" in methods
    for m in methods:
        cands = candidates(m, cfg, 6)
        assert len(cands) == len(set(cands)) == 6, m
        # the global setting is always a candidate (bp_von / bp_ng: their step)
        own = {"bp_von": cfg.von.lr, "bp_ng": cfg.ng.rho}
        assert cands[0].lr == own.get(m, cfg.lr), m
        assert cands == candidates(m, cfg, 6)  # fixed order
    assert {c.noise for c in candidates("bp", cfg, 6)} == {"homoscedastic"}
    assert {c.noise for c in candidates("bp_het", cfg, 6)} == {"heteroscedastic"}
    assert candidates("ensemble", cfg, 6)[0].init_var is None  # not variational
    with pytest.raises(ValueError, match="budget"):
        candidates("ensemble", cfg, 1000)


def test_search_never_reads_test_rows(tmp_path):
    """The test rows of split 0 set to NaN: the selection is bit-for-bit the
    same; only the final phase reads them (and refuses the NaN)."""
    _write_uci(tmp_path)
    data = load_uci("yacht", tmp_path)
    cfg = _tiny()
    cands = candidates("bp_het", cfg, 6)
    cands = [c for c in cands if c.structure == cands[0].structure][:3]  # 1 program
    clean = select_group(data, "bp_het", [0], cfg, cands)
    x, y = data.x.copy(), data.y.copy()
    x[data.test_index[0]] = np.nan
    y[data.test_index[0]] = np.nan
    bad = dataclasses.replace(data, x=x, y=y)
    corrupt = select_group(bad, "bp_het", [0], cfg, cands)
    for k in ("candidate", "epochs", "val_ll"):
        np.testing.assert_array_equal(clean[k], corrupt[k])
    with pytest.raises(DataError):
        run_search_group(bad, "bp_het", [0], cfg, log=lambda *_: None)


def test_search_seeds_score_the_mean_of_independent_trainings(tmp_path, monkeypatch):
    """``search_seeds=2``: each (candidate, split) validation curve is the mean
    of the curves of two trainings -- the one ``search_seeds=1`` runs (same
    key: protocol-3 records stay reproducible) and one with an independent key;
    the selection is the argmax of that mean."""
    from dualflow.benchmarks import uci_search

    _write_uci(tmp_path)
    data = load_uci("yacht", tmp_path)
    cfg = _tiny()
    cfg.max_steps = 48
    cands = candidates("bp", cfg, 3)
    one = select_group(data, "bp", [0, 1], cfg, cands)
    cfg.search_seeds = 2
    two = select_group(data, "bp", [0, 1], cfg, cands)
    orig = uci_search._run_key
    monkeypatch.setattr(  # the second training's key, alone
        uci_search, "_run_key", lambda key, k, c, r: orig(key, k, c, r + 1)
    )
    cfg.search_seeds = 1
    other = select_group(data, "bp", [0, 1], cfg, cands)
    assert np.all(np.isfinite(one["val"])) and np.all(np.isfinite(other["val"]))
    assert np.abs(one["val"] - other["val"]).max() > 1e-3  # independent trainings
    np.testing.assert_allclose(
        two["val"], (one["val"] + other["val"]) / 2, rtol=1e-5, atol=1e-6
    )
    c, e, best = select((one["val"] + other["val"]) / 2)
    np.testing.assert_array_equal(two["candidate"], c)
    np.testing.assert_array_equal(two["epochs"], (e + 1) * (two["epoch_budget"] // 3))
    for bad in (0, -1):
        cfg.search_seeds = bad
        with pytest.raises(ValueError, match="search_seeds"):
            select_group(data, "bp", [0], cfg, cands[:1])
    for bad in (1.5, True, "2"):  # values a ConfigDict would refuse itself
        with pytest.raises(ValueError, match="search_seeds"):
            uci_search.search_seeds_of(types.SimpleNamespace(search_seeds=bad))
    assert uci_search.search_seeds_of(types.SimpleNamespace()) == 1  # older configs


def test_search_seeds_enter_the_fingerprint_only_when_not_one():
    from dualflow.benchmarks import uci_run, uci_search

    cfg = uci_bench.default_config()
    assert "search_seeds" not in uci_bench.config_fingerprint(cfg)
    assert "trainings" not in uci_run._header(cfg, "cmd", "abc", 60.0, 60.0)
    # the first training of a candidate keeps protocol 3's key
    key = jax.random.key(5)
    old = jax.random.fold_in(jax.random.fold_in(key, 7), 2)
    np.testing.assert_array_equal(
        jax.random.key_data(uci_search._run_key(key, 7, 2, 0)),
        jax.random.key_data(old),
    )
    cfg.search_seeds = 3
    assert uci_bench.config_fingerprint(cfg)["search_seeds"] == 3
    header = uci_run._header(cfg, "cmd", "abc", 60.0, 60.0)
    assert "each scored by the mean of 3 trainings" in header


def test_search_prefers_the_candidate_with_better_validation_ll(tmp_path):
    """A learning rate of 1e-9 leaves the network at its initialisation; the
    search must pick the candidate that learns (its validation LL is higher)."""
    _write_uci(tmp_path)
    data = load_uci("yacht", tmp_path)
    cfg = _tiny(budget=2)
    cfg.max_steps = 150
    frozen = Candidate(lr=1e-9, noise="homoscedastic")
    learns = Candidate(lr=3e-2, noise="homoscedastic")
    sel = select_group(data, "ensemble", [0, 1], cfg, [frozen, learns])
    assert np.all(sel["val_ll"] > -1.5)
    np.testing.assert_array_equal(sel["candidate"], [1, 1])


def test_records_carry_the_chosen_setting(tmp_path):
    _write_uci(tmp_path)
    data = load_uci("yacht", tmp_path)
    cfg = _tiny(budget=2)
    cands = [Candidate(lr=lr, noise="heteroscedastic", init_var=1e-3, prior_var=1.0)
             for lr in (1e-2, 3e-2)]  # fmt: skip
    recs = run_search_group(data, "bp_het", [0, 1], cfg, log=print, cands=cands)
    assert [r["split"] for r in recs] == [0, 1]
    for r in recs:
        assert {"dataset", "method", "split", "rmse", "test_ll", "seconds"} <= set(r)
        assert math.isfinite(r["rmse"]) and math.isfinite(r["test_ll"])
        assert r["chosen"] == {**cands[r["candidate"]].as_dict(), "epochs": r["epochs"]}
        assert r["chosen"]["noise"] == "heteroscedastic"
        assert 1 <= r["epochs"] <= r["epoch_budget"] and r["search_budget"] == 2
        assert r["n_train"] == 52 and r["n_test"] == 8


def test_final_phase_tests_the_snapshot_at_the_chosen_epoch(tmp_path):
    """Training past a split's chosen epoch leaves its parameters frozen: the
    test metrics equal those of a run that stops there (same key)."""
    from dualflow.benchmarks import uci_search
    from dualflow.data.uci import uci_split

    _write_uci(tmp_path)
    data = load_uci("yacht", tmp_path)
    cfg = _tiny()
    cand = Candidate(lr=1e-2, noise="heteroscedastic", init_var=1e-3, prior_var=1.0)
    stacked = uci_bench._stack_splits([uci_split(data, 0)])
    steps = 52 // 16

    def test_metrics(epochs, cutoff=4 * steps):
        runs = uci_search._runs([cand], [0], [0], [jax.random.key(3)], [cutoff])
        return uci_search._run_structure(
            "bp_het", cand, cfg, data.n_hidden, stacked, runs,
            epochs=epochs, eval_every=1, num_samples=4, final=True,
        )  # fmt: skip

    short, long = test_metrics(4), test_metrics(9)
    np.testing.assert_allclose(long["ll"], short["ll"], rtol=1e-6)
    np.testing.assert_allclose(long["se"], short["se"], rtol=1e-6)
    assert abs(test_metrics(4, cutoff=steps)["ll"][0] - short["ll"][0]) > 1e-3


@pytest.mark.slow
def test_every_method_runs_through_the_search(tmp_path):
    """Every method (UCI_METHODS read now, plus bp_het) searches two
    candidates, retrains and reports finite metrics (slow: ~2 compilations per
    method; --runslow)."""
    _write_uci(tmp_path)
    data = load_uci("yacht", tmp_path)
    cfg = _tiny(budget=2)
    for m in search_methods():
        (r,) = run_search_group(data, m, [1], cfg, log=lambda *_: None)
        assert math.isfinite(r["rmse"]) and math.isfinite(r["test_ll"]), m
        assert r["chosen"] == {
            **candidates(m, cfg, 2)[r["candidate"]].as_dict(),
            "epochs": r["epochs"],
        }


# ----------------------------------------------------- heteroscedastic bp
@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_heteroscedastic_bp_predictive_matches_monte_carlo(x64, floor):
    """A linear heteroscedastic Regressor: bp's output beliefs are exact, so its
    predictive density E_w N(y; f_w, floor + exp g_w) is what weight sampling
    (reparam) estimates.  The quadrature must agree with an S-sample Monte
    Carlo estimate within 4 of its standard errors (delta method on log);
    ``floor`` is the likelihood's noise floor, in both."""
    lik = dnn.Likelihood("heteroscedastic", min_noise_var=floor)
    model = dnn.Regressor(
        2, (), 1, heteroscedastic=True, rngs=nnx.Rngs(1), param_dtype=jnp.float64
    )
    head = model.net.net.layers[-1]
    head.kernel_logvar[...] = jnp.full_like(head.kernel_logvar[...], math.log(0.3))
    head.bias_logvar[...] = jnp.full_like(head.bias_logvar[...], math.log(0.2))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 2)))
    out = dnn.apply(model, x, dnn.Method("bp"))
    sd = np.sqrt(out.var[:, :1] + floor + np.exp(out.mean[:, 1:]))
    y = out.mean[:, :1] + jnp.linspace(-2, 2, 5)[:, None] * sd
    ll = np.asarray(heteroscedastic_bp_log_likelihood(out, y, min_var=floor))
    assert ll.shape == (5,)

    s = 100_000
    pred = dnn.predict(
        model,
        x,
        method=dnn.Method("reparam"),
        likelihood=lik,
        key=jax.random.key(0),
        num_samples=s,
    )
    m, v = np.asarray(pred.sample_mean[..., 0]), np.asarray(pred.sample_var[..., 0])
    assert v.min() > floor  # the floor is in every sample's noise
    dens = np.exp(-0.5 * (np.log(2 * np.pi * v) + (np.asarray(y[:, 0]) - m) ** 2 / v))
    p_hat = dens.mean(0)
    se_log = dens.std(0, ddof=1) / math.sqrt(s) / p_hat
    assert np.all(se_log < 0.02)  # the test has power
    np.testing.assert_array_less(np.abs(ll - np.log(p_hat)), 4 * se_log)
    # it is the mixture, not the moment-matched Gaussian of dnn.predict
    mm = dnn.predictive_log_likelihood(
        dnn.predict(
            model,
            x,
            method=dnn.Method("bp"),
            likelihood=lik,
        ),
        y,
    )
    assert np.max(np.abs(np.asarray(mm) - ll)) > 4 * se_log.max()


def test_noise_floor_enters_training_prediction_and_fingerprint():
    """``min_noise_var`` adds to the heteroscedastic noise variance in the
    training NLL and the closed-form predictive; it is refused where it has no
    meaning; the UCI fingerprint carries it only when set."""
    from dualflow import objectives
    from dualflow.gaussian import Gaussian
    from dualflow.nn.methods import _nll

    z = Gaussian(jnp.array([-30.0, 0.0]), jnp.array([0.0, 0.5]))
    noise = objectives.heteroscedastic_noise(z, 1e-6)
    np.testing.assert_allclose(noise, 1e-6 + np.exp([-30.0, 0.25]), rtol=1e-6)
    model = dnn.Regressor(2, (3,), 1, heteroscedastic=True, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 2))
    y = jnp.zeros((4, 1))
    bp = dnn.Method("bp")
    out = dnn.apply(model, x, bp)
    for floor in (0.0, 0.3):
        lik = dnn.Likelihood("heteroscedastic", min_noise_var=floor)
        pred = dnn.predict(model, x, method=bp, likelihood=lik)
        noise = np.exp(out.mean[:, 1:] + 0.5 * out.var[:, 1:])
        np.testing.assert_allclose(pred.var, out.var[:, :1] + floor + noise, rtol=1e-6)
        ref = objectives.gaussian_nll(
            Gaussian(out.mean[:, :1], out.var[:, :1]), y, floor + noise
        )
        np.testing.assert_allclose(_nll(model, out, y, bp, lik), ref[:, 0], rtol=1e-6)
    for bad, kind in ((-1e-3, "heteroscedastic"), (1e-6, "gaussian")):
        with pytest.raises(ValueError, match="min_noise_var"):
            dnn.Likelihood(kind, min_noise_var=bad)
    cfg = uci_bench.default_config()
    assert "min_noise_var" not in uci_bench.config_fingerprint(cfg)
    assert uci_bench._likelihood(cfg) == dnn.Likelihood("gaussian")
    cfg.min_noise_var, cfg.heteroscedastic = 1e-6, True
    assert uci_bench.config_fingerprint(cfg)["min_noise_var"] == 1e-6
    assert uci_bench._likelihood(cfg).min_noise_var == 1e-6


# ------------------------------------------------------------------ script
def test_script_records_chosen_settings_and_resumes(tmp_path):
    _write_uci(tmp_path / "data")
    work = tmp_path / "out"
    args = [
        sys.executable,
        str(ROOT / "scripts" / "uci.py"),
        "--config=configs/uci.py",
        f"--workdir={work}",
        f"--config.data_dir={tmp_path / 'data'}",
        "--config.datasets=yacht",
        "--config.methods=bp_het",
        "--config.splits=0",
        "--config.max_steps=24",
        "--config.eval_points=2",
        "--config.search_budget=2",
        "--config.progress=False",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (rec,) = json.loads((work / "results.json").read_text())
    assert rec["method"] == "bp_het" and rec["chosen"]["noise"] == "heteroscedastic"
    assert rec["config"]["search_budget"] == 2
    assert "Chosen hyper-parameters" in (work / "table.md").read_text()
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 finished records reused, 0 to run" in res.stdout
    assert json.loads((work / "results.json").read_text()) == [rec]


def test_optimiser_settings_are_part_of_the_fingerprint():
    """A rerun with another bp_ng / bp_von step must not reuse old records."""
    from dualflow.benchmarks.uci import config_fingerprint, default_config

    base = config_fingerprint(default_config())
    for section, key, value in (("von", "lr", 0.1), ("ng", "rho", 0.5)):
        cfg = default_config()
        cfg[section][key] = value
        assert config_fingerprint(cfg) != base, (section, key)


def test_own_step_methods_search_their_own_step():
    """bp_von's Newton step and bp_ng's rho are what their lr dimension moves
    (Adam's rate only drives their noise variance)."""
    from dualflow.benchmarks.uci import default_config
    from dualflow.benchmarks.uci_search import OWN_STEP, SPACE, candidates

    cfg = default_config()
    for name, (section, field, grid) in (
        ("bp_von", OWN_STEP["von"]),
        ("bp_ng", OWN_STEP["natural_gradient"]),
    ):
        cands = candidates(name, cfg, budget=4)
        assert cands[0].lr == cfg[section][field], name
        assert {c.lr for c in cands[1:]} <= set(grid) | {cands[0].lr}, name
    assert {c.lr for c in candidates("bp", cfg, budget=3)} <= set(SPACE["lr"]) | {
        cfg.lr
    }


def test_search_space_is_part_of_the_fingerprint(monkeypatch):
    """Records of another grid must not be reused as finished."""
    from dualflow.benchmarks import uci_search
    from dualflow.benchmarks.uci import config_fingerprint, default_config

    base = config_fingerprint(default_config())
    monkeypatch.setitem(uci_search.SPACE, "lr", (1e-3,))
    assert config_fingerprint(default_config()) != base


def test_bad_budget_is_refused_before_anything_runs(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    bad = [("search_budget", "7"), ("search_budget", "0"), ("search_seeds", "0")]
    for field, value in bad:  # the ensemble grid has 6 points
        out = subprocess.run(
            [sys.executable, str(repo / "scripts" / "uci.py"),
             "--config=configs/uci.py", f"--config.{field}={value}",
             f"--workdir={tmp_path / 'w'}"],
            capture_output=True, text=True, cwd=repo, timeout=120,
        )  # fmt: skip
        assert out.returncode != 0
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert lines[0].startswith(f"error: config.{field}"), out.stderr[-800:]
        assert "Traceback" not in out.stderr
        assert not (tmp_path / "w").exists()


def test_a_diverged_retraining_falls_back_to_the_next_best_setting(monkeypatch):
    """Split 1's retraining goes non-finite with candidate 0: it is retrained
    with its next-best validation candidate (1), and only split 1 is rerun."""
    from dualflow.benchmarks import uci_search

    calls = []

    def fake_final(data, name, split_ids, cfg, sel):
        calls.append((list(split_ids), np.asarray(sel["candidate"]).tolist()))
        n = len(split_ids)
        finite = np.array(
            [
                not (k == 1 and c == 0)
                for k, c in zip(split_ids, sel["candidate"], strict=True)
            ]
        )
        return np.full(n, -1.0), np.full(n, 0.5), finite, [None] * n

    monkeypatch.setattr(uci_search, "_final", fake_final)
    monkeypatch.setattr(uci_search, "SMOOTH", 1)
    val = np.full((3, 2, 4), -5.0)
    val[0, :, 1] = -1.0  # candidate 0 best on both splits
    val[2, 1, 3] = -2.0  # split 1's runner-up: candidate 2 at point 3
    cand, point, best = uci_search.select(val)
    sel = {"candidate": cand, "epochs": (point + 1) * 10, "val_ll": best,
           "val": val, "epoch_budget": 40}  # fmt: skip
    ll, se, full, fallbacks = uci_search._final_with_fallback(
        None, "bp", [0, 1], None, sel
    )
    assert calls == [([0, 1], [0, 0]), ([1], [2])]
    assert fallbacks.tolist() == [0, 1]
    assert sel["candidate"].tolist() == [0, 2] and sel["epochs"].tolist() == [20, 40]
    assert sel["val_ll"].tolist() == [-1.0, -2.0]
