"""Fits of the known form over a table's measured cells, checked on held-out cells, to fill the cells a budgeted
sweep does not measure.

Forms (coefficients >= 0, least squares of the relative error, ``scipy.optimize.least_squares``), fitted locally:
over the ``LOCAL`` measured cells nearest the cells to fill along one axis, because a CPU's kernels change their
way of computing (row breaks, cache sizes) across a table, so one global form misses by tens of percent where a
local one holds:

- 1-D tables (the rest of a layer and the LM head in tokens, the collectives in bytes): ``a + b x`` over the
  largest measured sizes;
- 2-D attention tables: along the batch axis ``a + b B`` (independent prompts or rows: linear) over the column's
  largest measured batches; where a column holds too few, along the length axis over the row's longest measured
  lengths: ``a + b S + c S^2`` for prefill attention (linear plus quadratic in the prompt), ``a + b C`` for a
  decode step (linear in context).

The error is measured on held-out cells: in every column (1-D: the table) with enough measured cells, the largest
measured one is left out and predicted from the ones below it, as an extrapolation does; the largest and the
median relative error are recorded in the profile's provenance (``fits``) and the filled cells are flagged
(``exegpt.profile.ProfileTable.fitted``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from exegpt.profile import Kernel

LOCAL = 3
"""Measured cells a local fit uses (the nearest ones to the cells it fills)."""
TERMS = {"linear": "a + b x", "quadratic": "a + b x + c x^2"}
_DESIGN = {"linear": lambda x: np.stack([np.ones_like(x), x], axis=-1),
           "quadratic": lambda x: np.stack([np.ones_like(x), x, x * x], axis=-1)}


def length_form(kernel: Kernel) -> str:
    """The form of ``kernel``'s times along its length axis (prefill: quadratic; decode: linear)."""
    return "quadratic" if kernel is Kernel.ATTN_ENCODE else "linear"


def _solve(form: str, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the relative error of ``form`` at ``x`` against times ``t``."""
    A = _DESIGN[form](x) / t[:, None]
    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)  # columns of very different magnitudes (1 vs x^2)
    res = least_squares(lambda c: (A / scale) @ c - 1.0, x0=np.full(A.shape[1], 1.0 / A.shape[1]),
                        bounds=(0.0, np.inf), method="trf")
    return res.x / scale


def extend(form: str, x: np.ndarray, t: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``form`` fitted to the ``LOCAL`` largest measured sizes ``x`` (seconds ``t``), evaluated at ``at``; with
    fewer cells than the form has terms, the largest cell's time scaled in proportion."""
    order = np.argsort(x)[-LOCAL:]
    x, t = x[order], t[order]
    if len(x) < _DESIGN[form](x[:1]).shape[1]:
        return t[-1] * np.asarray(at, dtype=float) / x[-1]
    return _DESIGN[form](np.asarray(at, dtype=float)) @ _solve(form, x, t)


def held_out(form: str, x: np.ndarray, t: np.ndarray) -> float | None:
    """Relative error of predicting the largest measured cell from the ones below it (None: too few)."""
    if len(x) < _DESIGN[form](x[:1]).shape[1] + 1:
        return None
    order = np.argsort(x)
    top = order[-1]
    pred = extend(form, x[order[:-1]], t[order[:-1]], x[top:top + 1])[0]
    return float(abs(pred - t[top]) / t[top])


@dataclass(frozen=True, slots=True)
class Fit:
    """How a table's unmeasured cells were filled and how well the same fit predicted held-out cells."""

    forms: str
    held_out_error: float | None
    """Largest relative error |predicted - measured| / measured over the held-out cells (None: none held out)."""
    held_out_median: float | None
    held_out_points: int

    def to_dict(self) -> dict:
        return {"forms": self.forms, "local_points": LOCAL, "held_out_error": self.held_out_error,
                "held_out_median": self.held_out_median, "held_out_points": self.held_out_points}


def fill_table(kernel: Kernel, xs, ys, seconds: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, Fit | None]:
    """``seconds`` with its unmeasured cells (``measured`` False) filled by local fits of ``kernel``'s forms over
    the measured ones; returns the filled array and the fit's facts (None when every cell was measured).

    Args:
        xs, ys: the table's axes (``ys`` empty for 1-D tables).
        seconds, measured: arrays of the table's shape; unmeasured cells' values are ignored.
    """
    if measured.all():
        return seconds, None
    if not measured.any():
        raise ValueError(f"{kernel.value}: no measured cell to fit")
    xs = np.asarray(xs, dtype=float)
    out = np.array(seconds, dtype=float)
    if not len(ys):
        out[~measured] = extend("linear", xs[measured], out[measured], xs[~measured])
        err = held_out("linear", xs[measured], out[measured])
        errs = [] if err is None else [err]
        return np.maximum(out, 0.0), _facts("linear in x", errs)
    ys = np.asarray(ys, dtype=float)
    lform = length_form(kernel)
    errs = []
    for j in range(len(ys)):  # along the batch axis, column by column
        m = measured[:, j]
        e = held_out("linear", xs[m], out[m, j])
        if e is not None:
            errs.append(e)
        if m.sum() >= 2 and not m.all():
            out[~m, j] = extend("linear", xs[m], out[m, j], xs[~m])
    done = measured | (measured.sum(axis=0) >= 2)[None, :]
    for i in range(len(xs)):  # the rest along the length axis, row by row
        m = done[i]
        if not m.all():
            if m.any():
                out[i, ~m] = extend(lform, ys[m], out[i, m], ys[~m])
            else:  # nothing in this row: the nearest row's times scaled in batch
                k = int(np.argmin(np.where(done.any(axis=1), np.abs(np.arange(len(xs)) - i), len(xs) + 1)))
                out[i, ~m] = out[k, ~m] * xs[i] / xs[k] if done[k].all() else out[k].max() * xs[i] / xs[k]
    return np.maximum(out, 0.0), _facts(f"linear in batch; {TERMS[lform]} in length where a column had fewer "
                                        f"than 2 cells", errs)


def _facts(forms: str, errs: list[float]) -> Fit:
    return Fit(forms=forms, held_out_error=max(errs) if errs else None,
               held_out_median=float(np.median(errs)) if errs else None, held_out_points=len(errs))
