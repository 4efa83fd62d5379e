"""A sharded run that torchrun ends early (one rank died, so every rank is stopped):
rank 0 still writes one run from what every rank had written (issue 19)."""

from __future__ import annotations

import lossreg
from lossreg.planning import Task
from lossreg.results import ResultWriter
from lossreg.rows import base_row, run_context
from lossreg.sharding import RankInfo, salvage, select


class _Store:
    """torchrun's key-value store, holding what the ranks reported."""

    def __init__(self, done: dict[str, bytes], broken: bool = False):
        self.done, self.broken = done, broken

    def check(self, keys):
        if self.broken:
            raise RuntimeError("store connection closed")
        return all(k in self.done for k in keys)

    def get(self, key):
        return self.done[key]


def _tasks():
    specs = [lossreg.get("mse"), lossreg.get("mae")]
    return [Task(spec, spec.implementations[i], "float32", n, "quick")
            for spec in specs for n in spec.sizes["quick"] for i in ("reference", "torch")]


def _rows(task, rank, run_id):
    row = base_row(run_context("cpu", "cpu", run_id), task, dict(task.spec.options))
    row.update(check="throughput", mode="full", status="ok", time_ms=1.0, rank=rank,
               world_size=3)
    return [row]


def test_salvage_keeps_every_written_row_and_names_what_stopped_each_rank(tmp_path):
    tasks, run_id = _tasks(), "20261202T000000Z-abcdef"
    shares = [select(tasks, None, RankInfo(r, 3, r, 3)) for r in range(3)]
    assert all(shares), "each of the three ranks has a share"
    written = {0: shares[0][:1], 1: shares[1][:1], 2: shares[2]}  # rank 2 had finished
    for r, done in written.items():
        w = ResultWriter(tmp_path / f"_rank-{r}", run_id)
        for t in done:
            w.write(_rows(t, r, run_id))
    store = _Store({f"lossreg/{run_id}/done/2": b"ok"})
    df = salvage(tmp_path, run_id, tasks, 3, store, "stopped by SIGTERM")
    assert [p.name for p in tmp_path.iterdir()] == [f"run-{run_id}.parquet"]
    ok = df[df.status == "ok"]
    assert len(ok) == sum(len(v) for v in written.values())  # nothing written is lost
    lost = df[df.status == "error"]
    expected = {(t.impl.name, t.n, r) for r in (0, 1) for t in shares[r][1:]}
    assert set(zip(lost.impl, lost.n, lost["rank"])) == expected
    assert lost[lost["rank"] == 0].message.str.contains("stopped by SIGTERM").all()
    assert lost[lost["rank"] == 1].message.str.contains("torchrun stops every rank").all()
    # with the job's store already gone, the other ranks' status reads as stopped too
    w = ResultWriter(tmp_path / "_rank-0", "r2")
    w.write(_rows(tasks[0], 0, "r2"))
    df2 = salvage(tmp_path, "r2", tasks, 3, _Store({}, broken=True), "stopped by SIGINT")
    assert (df2.status == "ok").sum() == 1 and (df2.status == "error").sum() == len(tasks) - 1
