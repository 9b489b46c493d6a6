"""The compiled kernel's 2^f polynomial is the minimax fit its derivation script makes, and is accurate in float32."""

import sys

import numpy as np

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import exp2_polynomial  # noqa: E402


def test_the_kernel_holds_the_fitted_coefficients():
    kernel = exp2_polynomial.kernel_coefficients(exp2_polynomial.KERNEL.read_text())
    fitted, bound = exp2_polynomial.minimax(5)
    assert kernel.shape == (6,) and kernel[0] == 1.0  # 2^0 = 1 exactly: the largest logit's term
    np.testing.assert_allclose(kernel, fitted.astype(np.float32), rtol=1e-6)
    assert bound < 1e-7


def test_the_kernel_polynomial_is_accurate_in_float32_and_a_wrong_digit_is_not():
    kernel = exp2_polynomial.kernel_coefficients(exp2_polynomial.KERNEL.read_text())
    assert exp2_polynomial.float32_error(kernel, step=2.0 ** -16) < 2e-7
    typo = kernel.copy()
    typo[3] *= 1.001  # one digit off in the cubic term
    assert exp2_polynomial.float32_error(typo, step=2.0 ** -16) > 1e-5
