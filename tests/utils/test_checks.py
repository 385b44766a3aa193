"""wsis_d2.utils.checks: each check passes good input and names the argument on bad input."""

import unittest

import numpy as np
import torch

from wsis_d2.utils.checks import (
    check_binary,
    check_disjoint,
    check_finite,
    check_floating_dtype,
    check_integer_dtype,
    check_nonnegative,
    check_number,
    check_same_shape,
    check_tensor,
    value_checks,
    value_checks_enabled,
)


class TestChecks(unittest.TestCase):
    def test_tensor_and_shape(self):
        check_tensor("x", torch.zeros(2, 3), (2, None))
        with self.assertRaisesRegex(TypeError, "f: 'x' must be a torch.Tensor, got ndarray"):
            check_tensor("x", np.zeros(2), where="f")
        with self.assertRaisesRegex(ValueError, r"'x' must have shape \(2, \*\), got \(3, 3\)"):
            check_tensor("x", torch.zeros(3, 3), (2, None))
        with self.assertRaisesRegex(ValueError, r"'x' must have shape \(4,\), got \(4, 1\)"):
            check_tensor("x", torch.zeros(4, 1), (4,))
        with self.assertRaisesRegex(ValueError, "'x' must have 2 or 3 dimensions, got shape"):
            check_tensor("x", torch.zeros(1), ndim=(2, 3))
        with self.assertRaisesRegex(ValueError, r"'a' and 'b' .* got \(2,\) and \(3,\)"):
            check_same_shape("a", torch.zeros(2), "b", torch.zeros(3))

    def test_values(self):
        check_binary("m", torch.tensor([0.0, 1.0]))
        with self.assertRaisesRegex(
            ValueError, r"'m' must hold only 0 and 1, got 2 at index \(1,\)"
        ):
            check_binary("m", torch.tensor([1, 2]))
        with self.assertRaisesRegex(
            ValueError, r"'m' must hold only 0 and 1, got 0.5 at index \(0, 1\)"
        ):
            check_binary("m", np.array([[0.0, 0.5]]))
        check_finite("v", torch.tensor([float("inf")]), allow_inf=True)
        with self.assertRaisesRegex(
            ValueError, "'v' must not contain NaN or infinite values, got inf"
        ):
            check_finite("v", torch.tensor([1.0, float("inf")]))
        with self.assertRaisesRegex(ValueError, "'v' must not contain NaN, got nan"):
            check_finite("v", np.array([np.nan]), allow_inf=True)
        with self.assertRaisesRegex(ValueError, r"'c' must be >= 0, got -3 at index \(1,\)"):
            check_nonnegative("c", torch.tensor([0, -3]))
        with self.assertRaisesRegex(ValueError, "'c' must be >= 0, got nan"):
            check_nonnegative("c", torch.tensor([float("nan")]))
        with self.assertRaisesRegex(
            ValueError, r"'p' and 'q' must not overlap, both are True at index \(0, 1\)"
        ):
            check_disjoint("p", torch.tensor([[0, 1]]), "q", torch.tensor([[1, 1]]))

    def test_value_checks_can_be_turned_off(self):
        bad = torch.tensor([0.5])
        with value_checks(False):
            self.assertFalse(value_checks_enabled())
            check_binary("m", bad)
            check_finite("v", torch.tensor([float("nan")]))
        self.assertTrue(value_checks_enabled())
        with self.assertRaises(ValueError):
            check_binary("m", bad)

    def test_dtypes_and_numbers(self):
        check_integer_dtype("k", torch.zeros(2, dtype=torch.int32))
        for bad in (torch.zeros(2), torch.zeros(2, dtype=torch.bool), np.zeros(2)):
            with self.assertRaisesRegex(TypeError, "'k' must have an integer dtype"):
                check_integer_dtype("k", bad)
        with self.assertRaisesRegex(
            TypeError, "'d' must have a floating-point dtype, got torch.int64"
        ):
            check_floating_dtype("d", torch.zeros(2, dtype=torch.long))
        check_number("t", 0.5, 0.0, 1.0)
        with self.assertRaisesRegex(ValueError, r"'t' must lie in \[0.0, 1.0\], got 1.5"):
            check_number("t", 1.5, 0.0, 1.0)
        with self.assertRaisesRegex(ValueError, r"'t' must lie in \(0.0, inf\], got 0.0"):
            check_number("t", 0.0, 0.0, low_open=True)
        with self.assertRaisesRegex(ValueError, "got nan"):
            check_number("t", float("nan"))
        with self.assertRaisesRegex(TypeError, "'n' must be an integer, got True"):
            check_number("n", True, integer=True)
        with self.assertRaisesRegex(TypeError, "'n' must be a real number, got '3'"):
            check_number("n", "3")


if __name__ == "__main__":
    unittest.main()
