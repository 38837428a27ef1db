"""Compiled (numba) filter masks over every row: the quantized superset mask a batch's scan and
visit plan read, and the exact mask (counts, tests, the exact fallback)."""

from __future__ import annotations

import hearth.extras.vecsearch  # noqa: F401 -- first: names the extra if it is missing

# isort: split

import numpy as np
from numba import njit

from .row_kernels import OP_LEAF, apply_op, eval_exact, is_live


@njit(nogil=True, cache=True)
def quantized_mask(prog, leaf_attr, allowed, acodes, alive, out):
    """Superset mask from attribute *codes*: a row passes if its cells may satisfy the predicate."""
    n = out.shape[0]
    stack = np.zeros(max(1, prog.shape[0]), dtype=np.bool_)
    for i in range(n):
        if is_live(alive, i) == 0:
            out[i] = 0
            continue
        sp = 0
        for t in range(prog.shape[0]):
            op = prog[t, 0]
            if op == OP_LEAF:
                j = prog[t, 1]
                stack[sp] = allowed[j, acodes[leaf_attr[j], i]] != 0
                sp += 1
            else:
                sp = apply_op(op, stack, sp)
        out[i] = 1 if stack[0] else 0


@njit(nogil=True, cache=True)
def exact_mask(pred, alive, out):
    """Exact predicate over every live row (used for counts, tests and the exact fallback);
    ``pred`` as in row_kernels.eval_exact."""
    n = out.shape[0]
    nprog = pred[0].shape[0]
    stack = np.zeros(max(1, nprog), dtype=np.bool_)
    for i in range(n):
        if is_live(alive, i) == 0:
            out[i] = 0
        elif nprog == 0:
            out[i] = 1
        else:
            out[i] = 1 if eval_exact(pred, i, stack) else 0
