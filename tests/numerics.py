"""Finite differences, the independent reference every hand-written gradient is tested against."""
import numpy as np


def finite_diff(f, x, eps=1e-5):
    """Central differences (f(x + eps e_i) - f(x - eps e_i)) / 2 eps of the scalar f() for every
    entry i of x (changed in place, then restored)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def rel_error(a, b):
    """|a - b| / max(|a|, |b|): symmetric, and 1 when one side is zero and the other is not."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))
