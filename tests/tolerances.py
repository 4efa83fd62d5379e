"""The tests' view of the one tolerance table (`lossreg.tolerances`), keyed by torch
dtype: (rtol, atol) against the float64 reference, the same figures `lossreg check` uses."""

from lossreg.spec import DTYPES
from lossreg.tolerances import DEFAULT_TOLERANCES

TOL = {DTYPES[name]: tol for name, tol in DEFAULT_TOLERANCES.items()}


def assert_close64(out, ref64, dtype, what=""):
    rtol, atol = TOL[dtype]
    out, ref64 = out.detach().double(), ref64.detach()
    diff = (out - ref64).abs()
    rel = float(diff.norm() / ref64.norm()) if float(ref64.norm()) > 0 else float(diff.max())
    assert rel <= rtol or float(diff.max()) <= atol, f"{what}: rel {rel:.3g} (rtol {rtol})"
