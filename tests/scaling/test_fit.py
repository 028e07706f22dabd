"""The power-law fit recovers known parameters from noisy synthetic data, and its intervals
contain the truth about as often as their level says."""

from __future__ import annotations

import numpy as np
import pytest

from tools.scaling.fit import fit_power_law, power_law

TRUTH = {"a": 1.7, "b": 0.28, "c": 2.1}
C0 = 3e17


def _data(seed: int, n: int = 12, noise: float = 0.01):
    rng = np.random.default_rng(seed)
    compute = np.geomspace(1e16, 1e20, n) * rng.uniform(0.8, 1.25, n)
    loss = power_law(compute, TRUTH["a"], TRUTH["b"], TRUTH["c"], C0)
    return compute, loss + rng.normal(0.0, noise, n)


def test_wald_intervals_cover_the_truth() -> None:
    covered = {k: 0 for k in TRUTH}
    for seed in range(40):
        compute, loss = _data(seed)
        fit = fit_power_law(compute, loss, c0=C0)
        for k, v in TRUTH.items():
            covered[k] += fit.contains(k, v)
    # 95% intervals over 40 noisy data sets: 38 expected; fewer than 34 (p < 1%) would mean
    # intervals that are too narrow or biased estimates.
    assert all(n >= 34 for n in covered.values()), covered
    # ... and they are not vacuous: the exponent is pinned to a few hundredths.
    compute, loss = _data(0)
    fit = fit_power_law(compute, loss, c0=C0)
    assert fit.ci["b"][1] - fit.ci["b"][0] < 0.05
    assert abs(fit.b - TRUTH["b"]) < 0.02 and abs(fit.c - TRUTH["c"]) < 0.05


def test_bootstrap_intervals_and_default_reference() -> None:
    compute, loss = _data(7, n=16)
    fit = fit_power_law(compute, loss, method="bootstrap", n_boot=300, seed=1)
    # Default c0 is the geometric mean of the compute: a is the reducible loss there.
    c0 = float(np.exp(np.mean(np.log(compute))))
    assert fit.c0 == pytest.approx(c0)
    a_at_c0 = TRUTH["a"] * (c0 / C0) ** (-TRUTH["b"])
    assert fit.contains("b", TRUTH["b"]) and fit.contains("c", TRUTH["c"])
    assert fit.contains("a", a_at_c0)
    assert np.allclose(fit.predict(compute), power_law(compute, fit.a, fit.b, fit.c, fit.c0))


def test_a_different_exponent_is_told_apart() -> None:
    compute, _ = _data(3)
    rng = np.random.default_rng(3)
    steeper = power_law(compute, 1.7, 0.5, 2.1, C0) + rng.normal(0.0, 0.01, compute.size)
    fit = fit_power_law(compute, steeper, c0=C0)
    assert fit.contains("b", 0.5) and not fit.contains("b", TRUTH["b"])


@pytest.mark.parametrize(("compute", "loss", "needle"), [
    ([1, 2, 3], [3.0, 2.0, 1.5], "needs >= 4"),
    ([1, -2, 3, 4], [3.0, 2.0, 1.5, 1.4], "compute must be > 0"),
    ([1, 2, 3, 4], [3.0, 2.0, 1.5], "equal length"),
])
def test_bad_input_is_refused(compute, loss, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        fit_power_law(compute, loss)
