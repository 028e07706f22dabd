"""Loss vs compute: a power law with an offset, ``L(C) = a (C / C0)^(-b) + c``, and confidence
intervals.

``c`` is the irreducible loss, ``b`` the exponent, ``a`` the reducible loss at the reference
compute ``C0`` (the geometric mean of the data unless given, which keeps the fit well
conditioned when C spans many decades). Least squares with ``scipy.optimize.curve_fit``
(bounded: ``a, b > 0``, ``c >= 0``), started from a log-log line through ``L - c0``. Intervals:

* ``wald``: ``estimate +- t_(n-3) * standard error`` from the fit's covariance (residual variance
  estimated from the data; needs at least 4 points);
* ``bootstrap``: percentiles of refits on residual-resampled data (``n_boot`` draws).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

PARAMS = ("a", "b", "c")


def power_law(compute: np.ndarray, a: float, b: float, c: float, c0: float = 1.0) -> np.ndarray:
    """``a (compute / c0)^(-b) + c``."""
    return a * np.power(np.asarray(compute, dtype=float) / c0, -b) + c


@dataclass
class PowerLawFit:
    """A fitted ``L = a (C / c0)^(-b) + c`` with intervals."""

    a: float
    b: float
    c: float
    c0: float
    """Reference compute (FLOPs) at which ``a`` is the reducible loss."""
    n: int
    """Points fitted."""
    rmse: float
    """Root-mean-square residual."""
    level: float
    """Confidence level of the intervals (0.95)."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """``name -> (low, high)`` for a, b, c."""
    method: str = "wald"
    cov: list[list[float]] | None = None

    def predict(self, compute: Sequence[float] | np.ndarray) -> np.ndarray:
        return power_law(np.asarray(compute, dtype=float), self.a, self.b, self.c, self.c0)

    def contains(self, name: str, value: float) -> bool:
        low, high = self.ci[name]
        return low <= value <= high

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c, "c0": self.c0, "n": self.n,
                "rmse": self.rmse, "level": self.level, "method": self.method,
                "ci": {k: list(v) for k, v in self.ci.items()}, "cov": self.cov,
                "formula": "L = a * (C / c0)^(-b) + c"}


def _initial_guess(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    c0 = max(0.0, 0.9 * float(y.min()))
    slope, intercept = np.polyfit(np.log(x), np.log(np.maximum(y - c0, 1e-12)), 1)
    return float(math.exp(intercept)), max(float(-slope), 1e-3), c0


def _least_squares(x: np.ndarray, y: np.ndarray, p0) -> tuple[np.ndarray, np.ndarray]:
    return optimize.curve_fit(
        lambda xx, a, b, c: power_law(xx, a, b, c), x, y, p0=p0,
        bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, np.inf]), maxfev=20000)


def fit_power_law(
    compute: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    c0: float | None = None,
    level: float = 0.95,
    method: str = "wald",
    n_boot: int = 1000,
    seed: int = 0,
) -> PowerLawFit:
    """Fit ``loss = a (compute / c0)^(-b) + c``.

    Args:
        compute: training FLOPs per point (> 0).
        loss: the loss at each point.
        c0: reference compute; default the geometric mean of ``compute``.
        level: confidence level of the intervals.
        method: ``wald`` or ``bootstrap`` (see the module docstring).
        n_boot: bootstrap refits.
        seed: bootstrap RNG seed.

    Raises:
        ValueError: fewer than 4 points (3 parameters leave no residual to size an
            interval), non-positive compute, mismatched lengths, an unknown method.
    """
    x_raw = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if x_raw.shape != y.shape or x_raw.ndim != 1:
        raise ValueError(f"compute and loss must be 1-D of equal length, got {x_raw.shape} and "
                         f"{y.shape}")
    if len(y) < 4:
        raise ValueError(f"{len(y)} points: a 3-parameter power law with intervals needs >= 4")
    if np.any(x_raw <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("compute must be > 0 and loss finite")
    if method not in ("wald", "bootstrap"):
        raise ValueError(f"method={method!r}: choose 'wald' or 'bootstrap'")
    c0 = float(np.exp(np.mean(np.log(x_raw)))) if c0 is None else float(c0)
    x = x_raw / c0
    params, cov = _least_squares(x, y, _initial_guess(x, y))
    residuals = y - power_law(x, *params)
    fit = PowerLawFit(a=float(params[0]), b=float(params[1]), c=float(params[2]), c0=c0,
                      n=len(y), rmse=float(np.sqrt(np.mean(residuals**2))), level=level,
                      method=method, cov=np.asarray(cov).tolist())
    if method == "wald":
        t = stats.t.ppf(0.5 + level / 2, df=len(y) - 3)
        se = np.sqrt(np.maximum(np.diag(cov), 0.0))
        fit.ci = {k: (float(p - t * s), float(p + t * s)) for k, p, s in zip(PARAMS, params, se)}
    else:
        rng = np.random.default_rng(seed)
        fitted = power_law(x, *params)
        draws = []
        for _ in range(n_boot):
            y_star = fitted + rng.choice(residuals, size=len(y), replace=True)
            try:
                draws.append(_least_squares(x, y_star, params)[0])
            except RuntimeError:  # a refit that does not converge is left out
                continue
        draws_arr = np.asarray(draws)
        tail = 100 * (1 - level) / 2
        fit.ci = {k: (float(np.percentile(draws_arr[:, i], tail)),
                      float(np.percentile(draws_arr[:, i], 100 - tail)))
                  for i, k in enumerate(PARAMS)}
    return fit
