"""
Input checks of the public functions: each raises a ValueError (wrong shape or value) or a
TypeError (wrong kind of value) whose message names the argument, what was expected and what came.

Shape and dtype checks read only metadata. Value checks (0/1, finite, >= 0) reduce the tensor and,
on a GPU, wait for it: they are cheap next to the losses they guard (measured in the commit that
added them), and :func:`value_checks` turns them off where a caller has validated its inputs once.
"""

import contextlib
import numbers
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "check_tensor",
    "check_array",
    "check_same_shape",
    "check_binary",
    "check_finite",
    "check_nonnegative",
    "check_integer_dtype",
    "check_floating_dtype",
    "check_number",
    "check_disjoint",
    "value_checks",
    "value_checks_enabled",
]

ArrayLike = Union[torch.Tensor, np.ndarray]
_VALUE_CHECKS = [True]


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Within the block, the value checks (0/1, finite, >= 0, disjoint) run only if ``enabled``;
    shape and dtype checks always run."""
    previous = _VALUE_CHECKS[0]
    _VALUE_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS[0] = previous


def value_checks_enabled() -> bool:
    return _VALUE_CHECKS[0]


def _shape(x) -> Tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _fmt(shape: Sequence) -> str:
    """(N, C, 4) style, None printed as its symbol."""
    text = ", ".join("*" if s is None else str(s) for s in shape)
    return f"({text},)" if len(shape) == 1 else f"({text})"


def check_tensor(
    name: str,
    value,
    shape: Optional[Sequence[Optional[int]]] = None,
    where: str = "",
    ndim: Optional[Union[int, Sequence[int]]] = None,
) -> None:
    """
    ``value`` must be a torch tensor (TypeError otherwise) whose shape matches ``shape``, where
    None entries match any size, and/or whose number of dimensions is ``ndim`` (one or several).
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{prefix}'{name}' must be a torch.Tensor, got {type(value).__name__}")
    _check_shape(name, value, shape, prefix, ndim)


def _check_shape(name, value, shape, prefix, ndim) -> None:
    actual = _shape(value)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if len(actual) not in allowed:
            raise ValueError(
                f"{prefix}'{name}' must have {' or '.join(map(str, allowed))} dimensions, got "
                f"shape {actual}"
            )
    if shape is not None:
        ok = len(actual) == len(shape) and all(e is None or e == a for e, a in zip(shape, actual))
        if not ok:
            raise ValueError(f"{prefix}'{name}' must have shape {_fmt(shape)}, got {actual}")


def check_array(
    name: str,
    value: np.ndarray,
    shape: Optional[Sequence[Optional[int]]] = None,
    where: str = "",
    ndim: Optional[Union[int, Sequence[int]]] = None,
) -> None:
    """:func:`check_tensor` for an already converted numpy array (no type check)."""
    _check_shape(name, value, shape, f"{where}: " if where else "", ndim)


def check_same_shape(name_a: str, a: ArrayLike, name_b: str, b: ArrayLike, where: str = "") -> None:
    """``a`` and ``b`` must have equal shapes; the message gives both."""
    if _shape(a) != _shape(b):
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}'{name_a}' and '{name_b}' must have the same shape, got {_shape(a)} and "
            f"{_shape(b)}"
        )


def _first_bad(bad: ArrayLike, value: ArrayLike) -> str:
    """'value v at index (i, j)' of the first True of ``bad``."""
    if isinstance(bad, torch.Tensor):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        v = value[idx].item()
    else:
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        v = value[idx].item()
    return f"{v!r} at index {idx}"


def check_binary(name: str, value: ArrayLike, where: str = "") -> None:
    """Every entry of ``value`` must be 0 or 1 (bool passes)."""
    if not _VALUE_CHECKS[0] or value.dtype in (torch.bool, np.bool_):
        return
    bad = (value != 0) & (value != 1)
    if bool(bad.any()):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}'{name}' must hold only 0 and 1, got {_first_bad(bad, value)}")


def check_finite(name: str, value: ArrayLike, where: str = "", allow_inf: bool = False) -> None:
    """No NaN (and, unless ``allow_inf``, no ±inf) in ``value``."""
    if not _VALUE_CHECKS[0]:
        return
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return
        bad = torch.isnan(value) if allow_inf else ~torch.isfinite(value)
    else:
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            return
        bad = np.isnan(value) if allow_inf else ~np.isfinite(value)
    if bool(bad.any()):
        prefix = f"{where}: " if where else ""
        kind = "NaN" if allow_inf else "NaN or infinite values"
        raise ValueError(f"{prefix}'{name}' must not contain {kind}, got {_first_bad(bad, value)}")


def check_nonnegative(name: str, value: ArrayLike, where: str = "") -> None:
    """Every entry of ``value`` must be >= 0 (NaN fails too)."""
    if not _VALUE_CHECKS[0]:
        return
    bad = ~(value >= 0)
    if bool(bad.any()):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}'{name}' must be >= 0, got {_first_bad(bad, value)}")


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, where: str = ""):
    """Two bool masks of equal shape must never both be True."""
    if not _VALUE_CHECKS[0]:
        return
    both = a.bool() & b.bool()
    if bool(both.any()):
        prefix = f"{where}: " if where else ""
        idx = tuple(int(i) for i in both.nonzero()[0])
        raise ValueError(
            f"{prefix}'{name_a}' and '{name_b}' must not overlap, both are True at index {idx}"
        )


def check_integer_dtype(name: str, value: ArrayLike, where: str = "") -> None:
    """``value`` must hold integers (TypeError for floating point, complex or bool)."""
    dtype = value.dtype
    if isinstance(value, torch.Tensor):
        ok = not (value.is_floating_point() or value.is_complex() or dtype == torch.bool)
    else:
        ok = np.issubdtype(dtype, np.integer)
    if not ok:
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}'{name}' must have an integer dtype, got {dtype}")


def check_floating_dtype(name: str, value: ArrayLike, where: str = "") -> None:
    """``value`` must be floating point (TypeError otherwise)."""
    if isinstance(value, torch.Tensor):
        ok = value.is_floating_point()
    else:
        ok = np.issubdtype(value.dtype, np.floating)
    if not ok:
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}'{name}' must have a floating-point dtype, got {value.dtype}")


def check_number(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    integer: bool = False,
    where: str = "",
    low_open: bool = False,
) -> None:
    """
    ``value`` must be a real number (an integer if ``integer``; bool is neither: TypeError) in
    [low, high] ((low, high] if ``low_open``); a bound of None is open-ended. NaN fails.
    """
    prefix = f"{where}: " if where else ""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an integer" if integer else "a real number"
        raise TypeError(f"{prefix}'{name}' must be {expected}, got {value!r}")
    ok = value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ValueError(f"{prefix}'{name}' must lie in {bracket}{lo}, {hi}], got {value!r}")
