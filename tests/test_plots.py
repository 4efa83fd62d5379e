import pandas as pd

import lossreg
from lossreg.plots import plot_run


def test_plots_are_nonempty_pngs(tmp_path):
    df = lossreg.bench(["mse"], device="cpu", sizes="quick", rounds=1, out=tmp_path / "r",
                       plots=False)
    written = plot_run(df, tmp_path / "plots")
    assert {p.name for p in written} == {"time.png", "speedup.png", "memory.png",
                                         "bandwidth.png"}
    for p in written:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 400_000


def test_no_throughput_rows_no_plots(tmp_path):
    assert plot_run(pd.DataFrame({"check": ["correctness"], "status": ["ok"],
                                  "mode": ["forward"]}), tmp_path) == []
