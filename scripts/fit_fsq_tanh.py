"""Fits the polynomials of the CPU FSQ kernels' float32 tanh (tanh_lanes in csrc/cpu/fsq.cpp) and
prints their coefficients as the kernel spells them (float32, highest degree first).

    |x| < 0.75:  tanh(x) = x + x^3 P(x^2),           P of degree 5
    exp(r) = 1 + r + r^2 Q(r) for |r| <= ln(2) / 2,   Q of degree 4

Each is a minimax fit of the relative error of tanh or exp (Lawson's iteratively reweighted least
squares on 4000 points), with the exact values from mpmath. Run: python scripts/fit_fsq_tanh.py
"""

import mpmath as mp
import numpy as np

mp.mp.dps = 40
CUT = 0.75  # tanh_lanes switches to the exp form from |x| = CUT on
POINTS = 4000


def minimax(basis, target, weight, iterations=300):
    """Coefficients c minimising max |weight * (basis @ c - target)|, and that maximum."""
    w = np.full(len(target), 1.0 / len(target))
    for _ in range(iterations):
        sw = np.sqrt(w) * weight
        c = np.linalg.lstsq(basis * sw[:, None], target * sw, rcond=None)[0]
        err = np.abs(weight * (basis @ c - target))
        w = w * err
        w /= w.sum()
    return c, err.max()


def fit_tanh_small(degree=5):
    x = np.linspace(1e-4, CUT, POINTS)
    exact = [mp.tanh(mp.mpf(v)) for v in x]
    target = np.array([float((t - v) / mp.mpf(v) ** 3) for t, v in zip(exact, x)])
    s = x ** 2
    # the error of tanh from P's is x^3 dP, relative to tanh(x)
    return minimax(np.stack([s ** k for k in range(degree + 1)], 1), target,
                   x ** 3 / np.array([float(t) for t in exact]))


def fit_exp(degree=4):
    half = float(mp.log(2)) / 2 * 1.0001
    r = np.linspace(-half, half, POINTS)
    target = np.array([float((mp.exp(mp.mpf(v)) - 1 - v) / mp.mpf(v) ** 2) if v else 0.5 for v in r])
    exact = np.array([float(mp.exp(mp.mpf(v))) for v in r])
    return minimax(np.stack([r ** k for k in range(degree + 1)], 1), target, r ** 2 / exact)


if __name__ == "__main__":
    for name, (coef, err) in (("P", fit_tanh_small()), ("Q", fit_exp())):
        print(f"{name}: relative error {err:.3g}, coefficients from the highest degree down:")
        print("  " + ", ".join(f"{np.float32(c).item():.9e}f" for c in coef[::-1]))
