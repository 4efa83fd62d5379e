"""One table of per-dtype tolerances for the kernel tests: (rtol, atol) against float64."""

import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close64(out, ref64, dtype, what=""):
    rtol, atol = TOL[dtype]
    out, ref64 = out.detach().double(), ref64.detach()
    diff = (out - ref64).abs()
    rel = float(diff.norm() / ref64.norm()) if float(ref64.norm()) > 0 else float(diff.max())
    assert rel <= rtol or float(diff.max()) <= atol, f"{what}: rel {rel:.3g} (rtol {rtol})"
