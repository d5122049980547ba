"""Exact, order-independent sums of weighted arrays: what lets the server fold replies as they arrive.

Floating-point addition is not associative, so a running float64 sum of site updates depends on the order the
replies came in; sorting them first means holding them all. `ExactSum` holds instead a few float64 "bins"
per element: bin k holds the bits of every term that lie in [2^(kB), 2^((k+1)B)), B = 40. Each term is split
into its bin parts exactly (scaling by powers of two and truncating lose nothing), and a bin's sum is exact
while it stays below 2^53, i.e. for fewer than 2^13 terms. The bins are therefore the same, bit for bit,
whatever the order of the terms; the total is read by adding the bins from the lowest up, a fixed order, so
it is too. It is also as close to the true sum as float64 allows (within a few ulps; one term is read back
exactly).

Terms must be exact: a float32 (or float16) value times a whole weight below 2^26 is exact in float64, and a
float64 value is split into two 26-bit halves first (Dekker's split), each times the weight again exact.
Memory: one float64 array per bin a key's values touch (2-4 for network weights), whatever the number of
terms.
"""

from __future__ import annotations

import numpy as np

BIN_BITS = 40
MAX_TERMS = 2 ** (53 - BIN_BITS)  # bins stay exact for this many terms
MAX_WEIGHT = 2**26  # a whole weight below this keeps value * weight exact
_SPLIT = float(2**27 + 1)  # Dekker's splitter for float64: two halves of at most 26 significant bits


class ExactSum:
    """sum_i w_i * x_i over arrays x_i of one shape, exact and independent of the order (module docstring)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.bins: dict[int, np.ndarray] = {}
        self.terms = 0

    def add(self, values: np.ndarray, weight: float) -> None:
        """Add `weight * values`; `weight` must be a whole number in [0, 2^26)."""
        if not (float(weight).is_integer() and 0 <= weight < MAX_WEIGHT):
            raise ValueError(f"weight {weight!r}: must be a whole number below 2^26 (an example count)")
        if values.shape != self.shape:
            raise ValueError(f"values of shape {values.shape} added to a sum of shape {self.shape}")
        if self.terms >= MAX_TERMS:
            raise ValueError(f"more than {MAX_TERMS} terms: the bins could round; split the sum")
        self.terms += 1
        if values.dtype == np.float64:
            hi = values * _SPLIT
            hi = hi - (hi - values)  # the top 26 significant bits
            parts = (hi, values - hi)
        else:
            parts = (values.astype(np.float64),)
        for part in parts:
            self._deposit(part * float(weight))  # exact: at most 26 + 26 significant bits

    def total(self) -> np.ndarray:
        """The sum, as float64: the bins added from the lowest to the highest."""
        out = np.zeros(self.shape, dtype=np.float64)
        for k in sorted(self.bins):
            out += self.bins[k]
        return out

    def _deposit(self, exact: np.ndarray) -> None:
        """Add each element's bits to the bins they fall in; `exact` is consumed bit for bit."""
        nonzero = np.abs(exact[exact != 0])
        if nonzero.size == 0:
            return
        top = int(np.frexp(nonzero.max())[1]) // BIN_BITS  # frexp: x = m * 2^e, 0.5 <= |m| < 1
        bottom = (int(np.frexp(nonzero.min())[1]) - 53) // BIN_BITS  # the lowest bit a float64 can hold
        rest = exact
        for k in range(top, bottom - 1, -1):
            part = np.ldexp(np.trunc(np.ldexp(rest, -k * BIN_BITS)), k * BIN_BITS)
            if part.any():
                rest = rest - part
                if k in self.bins:
                    self.bins[k] += part
                else:
                    self.bins[k] = part
        if rest.any():  # cannot happen: every bit of a float64 lies in some bin from top down to bottom
            raise AssertionError("ExactSum: bits left after the lowest bin")
