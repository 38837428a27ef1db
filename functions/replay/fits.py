"""Distribution fits after the Huawei paper: LogNormal cold-start times, Weibull gaps between
cold starts, and their Kolmogorov-Smirnov distances to the fit and to the published parameters."""

from __future__ import annotations

import hearth.extras.replay  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import math
from collections.abc import Callable

import numpy as np
import polars as pl
from scipy import optimize, special  # not scipy.stats: 0.3 s to import, for three formulas

from .synth import PUBLISHED, lognormal_moments, lognormal_params, weibull_moments, weibull_params

FIT_SAMPLE = 400_000  # Weibull fit: seeded sample of at most this many gaps


def _sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if x.size <= n:
        return x
    return x[np.random.default_rng(seed).integers(0, x.size, n)]  # with replacement: O(n)


def ks_distance(sorted_x: np.ndarray, cdf: np.ndarray) -> float:
    """Kolmogorov-Smirnov D of a sorted sample against model CDF values at those points."""
    return _ks(np.asarray(cdf, dtype=float), lambda c: c)


KS_BLOCK = 1 << 16  # points per block of a KS distance (its temporaries stay in cache)


def _ks(t: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray]) -> float:
    """KS D of an ascending sample given as ``t`` (the sample or a monotone transform of it,
    e.g. its logs) and ``cdf(block)``: the model CDF at a copy of a block of ``t`` (it may
    overwrite its argument). With d_i = i/n - c_i, D = max(max d, 1/n - min d). Computed block
    by block: no n-sized temporaries (at 2 M points each is 16 MB of fresh pages)."""
    n = t.size
    hi, lo = -np.inf, np.inf
    for s in range(0, n, KS_BLOCK):
        d = cdf(t[s : s + KS_BLOCK].copy())
        np.subtract(np.arange(s + 1, s + 1 + d.size, dtype=float) / n, d, out=d)
        hi, lo = max(hi, float(d.max())), min(lo, float(d.min()))
    return max(hi, 1.0 / n - lo) if n else 0.0


def _report(
    head: dict,
    names: tuple[str, str],
    fit: tuple[float, float],
    x: np.ndarray,
    ks: Callable[[float, float], float],
    moments: Callable[[float, float], tuple[float, float]],
    published: str,
    params: Callable[..., tuple[float, float]],
) -> dict:
    """What both fits report: ``head`` (sample sizes), the fitted parameters under ``names``,
    their moments and the sample's, and the KS distances of ``x`` to the fit and to the
    published distribution ``PUBLISHED[published]`` (its parameters by ``params``)."""
    mean, sd = moments(*fit)
    pub = params(**PUBLISHED[published])
    return (
        head
        | dict(zip(names, fit, strict=True))
        | {
            "mean": mean,
            "sd": sd,
            "empirical_mean": float(x.mean()),
            "empirical_sd": float(x.std()),
            "ks_vs_fit": ks(*fit),
            "ks_vs_published": ks(*pub),
            "published": PUBLISHED[published] | dict(zip(names, pub, strict=True)),
        }
    )


def lognormal_cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return special.ndtr((np.log(x) - mu) / sigma)


def weibull_cdf(x: np.ndarray, k: float, lam: float) -> np.ndarray:
    return -np.expm1(-((x / lam) ** k))


def fit_lognormal(x: np.ndarray, presorted: bool = False) -> dict:
    """LogNormal MLE of the positive values, KS distances to the fit and to the published
    parameters; all on the whole array (``presorted``: ``x`` is ascending already)."""
    x = x if presorted else np.sort(x)
    x = x[np.searchsorted(x, 0.0, side="right") :]  # positive values
    if x.size and not np.isfinite(x[-1]):  # NaN and inf sort last
        x = x[np.isfinite(x)]
    lx = np.log(x)
    mu, sigma = float(lx.mean()), float(lx.std(ddof=0))
    n = x.size

    def ks(m: float, s: float) -> float:
        def cdf(c: np.ndarray) -> np.ndarray:
            c -= m
            c /= s
            return special.ndtr(c, out=c)

        return _ks(lx, cdf)

    return _report(
        {"n": int(n)},
        ("mu", "sigma"),
        (mu, sigma),
        x,
        ks,
        lognormal_moments,
        "coldstart_lognormal",
        lognormal_params,
    )


def weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Weibull (shape, scale) MLE with location 0, from the profile likelihood equation."""
    lx = np.log(x)
    mlx = lx.mean()
    z = lx - lx.max()  # scale-free: x^k / max^k
    w, wl = np.empty_like(z), np.empty_like(z)  # reused by every step of the root search

    def g(logk: float) -> float:  # no BLAS (np.dot): its spinning threads cost more than this
        k = math.exp(logk)
        np.exp(np.multiply(z, k, out=w), out=w)
        return float(np.multiply(w, lx, out=wl).sum() / w.sum() - 1.0 / k - mlx)

    k = math.exp(optimize.brentq(g, math.log(0.01), math.log(100.0), xtol=1e-10))
    lam = float(np.exp(mlx + np.log(np.mean(np.exp(k * (lx - mlx)))) / k))
    return k, lam


def _fill_zero_gaps(g: np.ndarray, resolution: float | None = None) -> np.ndarray:
    if g.size == 0:
        return g
    zero = g <= 0
    if not zero.any():
        return g
    if resolution is None:  # the smallest positive gap
        resolution = float(np.min(g, where=g > 0, initial=np.inf))
        resolution = resolution if math.isfinite(resolution) else 1e-3
    return np.where(zero, resolution / 2, g)


def interarrival_gaps(cold: pl.DataFrame, resolution: float | None = None) -> np.ndarray:
    """Time between consecutive cold starts within each region. Zero gaps (ties at the trace's
    time resolution) are replaced by half the resolution so the Weibull likelihood is defined."""
    if cold["region"].n_unique() == 1:  # the usual case: no sort by (string, time) needed
        g = np.diff(cold["time"].cast(pl.Float64).sort(multithreaded=False).to_numpy())
    else:
        g = (
            cold.select("region", "time")
            .sort(["region", "time"])
            .select(pl.col("time").diff().over("region").alias("g"))
            .drop_nulls()["g"]
            .to_numpy()
        )
    return _fill_zero_gaps(g, resolution)


def fit_weibull(
    gaps: np.ndarray, seed: int = 0, sample: int = FIT_SAMPLE, presorted: bool = False
) -> dict:
    """Weibull MLE on a seeded sample of at most ``sample`` gaps (drawn with replacement; the
    shape equation is solved on the sample), KS distances on all gaps."""
    gaps = gaps if presorted else np.sort(gaps)
    fit_on = _sample(gaps, sample, seed)
    k, lam = weibull_mle(fit_on)
    lg = np.log(gaps)
    n = gaps.size

    def ks(shape: float, scale: float) -> float:
        def cdf(c: np.ndarray) -> np.ndarray:  # 1 - exp(-(x/scale)^shape), in place
            c -= math.log(scale)
            c *= shape
            np.exp(c, out=c)
            np.negative(c, out=c)
            np.expm1(c, out=c)
            return np.negative(c, out=c)

        return _ks(lg, cdf)

    return _report(
        {"n": int(n), "fit_n": int(fit_on.size), "fit_sampled": bool(n > sample)},
        ("shape", "scale"),
        (k, lam),
        gaps,
        ks,
        weibull_moments,
        "interarrival_weibull",
        weibull_params,
    )
