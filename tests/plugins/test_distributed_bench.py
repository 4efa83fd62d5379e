"""`lossreg bench --world-size`: the distributed losses' per-rank time, peak memory and
bytes communicated per step, against the single-device loss (issue 19, point 4)."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

import lossreg
from lossreg.cli import main
from lossreg.distributed_bench import bench_distributed, summarize
from lossreg.planning import HarnessError
from lossreg.results import to_table
from test_distributed import toy_spec


@pytest.fixture(scope="module")
def vocab_rows():
    return bench_distributed(["vocab_parallel_cross_entropy"], [1, 2], impls=["torch", "fused"])


def test_every_case_at_every_world_size_on_every_rank(vocab_rows):
    spec = lossreg.get("vocab_parallel_cross_entropy")
    assert all(r["status"] == "ok" for r in vocab_rows), [r["message"] for r in vocab_rows]
    seen = {(r["impl"], r["n"], r["world_size"], r["rank"]) for r in vocab_rows}
    expected = {(i, n, 1, 0) for i in ("reference", "torch", "fused") for n in spec.sizes["quick"]}
    expected |= {(i, n, 2, r) for i in ("torch", "fused") for n in spec.sizes["quick"]
                 for r in (0, 1)}
    assert seen == expected and len(vocab_rows) == len(expected)
    for r in vocab_rows:
        assert r["check"] == "throughput" and r["mode"] == "full"
        assert r["time_ms_p20"] <= r["time_ms"] <= r["time_ms_p80"] and r["repeats"] >= 5
        assert r["peak_bytes"] > 0 and r["speedup"] > 0


def test_communication_is_o_tokens_and_memory_is_split(vocab_rows):
    """No bytes without a group; at most 16 bytes per token and rank over two ranks
    (two all-reduces: the row max, then the stacked sum of exps and target logit), and
    each rank's peak below the single-device loss's (a vocabulary half each)."""
    single = {(r["impl"], r["n"]): r["peak_bytes"] for r in vocab_rows if r["world_size"] == 1}
    for r in vocab_rows:
        if r["world_size"] == 1:
            assert r["comm_bytes"] == 0
            continue
        assert 0 < r["comm_bytes"] <= 16 * r["n"], r
        assert r["peak_bytes"] < single[(r["impl"], r["n"])], r
        assert r["peak_bytes"] < single[("reference", r["n"])], r


def test_summary_relates_each_world_size_to_the_single_device_loss(vocab_rows):
    df = to_table(vocab_rows).to_pandas()
    lines = summarize(df).splitlines()
    assert len(lines) == 1 + len({(r["impl"], r["n"], r["world_size"]) for r in vocab_rows})
    ws1 = [ln for ln in lines[1:] if ln.split()[4] == "1"]
    assert all(ln.split()[7] == "1.000x" for ln in ws1)  # vs its own single-device peak


def test_a_hung_rank_becomes_error_rows_and_the_run_ends():
    start = time.monotonic()
    rows = bench_distributed([toy_spec()], [2], dtypes=["float64"], impls=["hangs"],
                             case_timeout_s=5)
    assert time.monotonic() - start < 5 + 60
    status = {r["rank"]: (r["status"], r["message"]) for r in rows}
    assert status[1][0] == "error" and "hung" in status[1][1], status
    assert status[0][0] == "error" and len(rows) == 2


def test_bad_arguments_are_clear():
    with pytest.raises(HarnessError, match="not a distributed loss"):
        bench_distributed(["mse"], [2])
    with pytest.raises(HarnessError, match="world sizes"):
        bench_distributed(["vocab_parallel_cross_entropy"], [])
    with pytest.raises(HarnessError, match="torchrun"):
        bench_distributed(["vocab_parallel_cross_entropy"], [2], device="cuda")
    with pytest.raises(HarnessError, match="case timeout"):
        bench_distributed(["vocab_parallel_cross_entropy"], [2], case_timeout_s=-1)
    r = CliRunner().invoke(main, ["bench", "vocab_parallel_cross_entropy", "--world-size", "2",
                                  "--rounds", "2"])
    assert r.exit_code == 2 and "--rounds" in r.output


def test_in_a_job_rank_0_returns_one_run():
    """Under torchrun every rank draws its own run id; the rows rank 0 gathers carry
    its id and start time (a group of one here: the gather is the same code)."""
    import torch.distributed as dist

    from lossreg import ranks

    def work(tasks, context, rank, world, group, device, send):
        send(0, [{"run_id": "other-rank", "timestamp": None, "rank": rank}])

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = ranks.in_job(work, [], {"run_id": "mine", "timestamp": 7}, 0, "cpu")
    finally:
        dist.destroy_process_group()
    assert rows == [{"run_id": "mine", "timestamp": 7, "rank": 0}]


@pytest.mark.parametrize("command", ["check", "bench"])
def test_an_unwritable_out_stops_before_any_rank_starts(command, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    start = time.monotonic()
    r = CliRunner().invoke(main, [command, "vocab_parallel_cross_entropy", "--world-size", "2",
                                  "--out", str(blocker / "out")])
    assert r.exit_code == 2 and "is not a folder" in r.output, r.output
    assert "Errno" not in r.output and time.monotonic() - start < 5  # no rank was spawned


def _one_case_then_hang(tasks, context, rank, world, group, device, send):
    send(0, [{"rank": rank, "case": 0}])
    open(f"{context['marker']}.{rank}", "w").close()
    time.sleep(3600)


def test_sigterm_stops_the_ranks_and_keeps_the_finished_cases(tmp_path):
    """What `timeout` or a scheduler does to `bench --world-size`: the spawned ranks
    are killed, the rows they sent survive, the run says how far it got."""
    import os
    import signal
    import threading
    from pathlib import Path

    from lossreg import ranks
    from lossreg.planning import Task

    spec = toy_spec()
    tasks = [Task(spec, spec.implementations["right"], "float64", 7),
             Task(spec, spec.implementations["hangs"], "float64", 7)]
    marker = str(tmp_path / "sent")

    def terminate_when_both_sent():
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if all(Path(f"{marker}.{r}").exists() for r in (0, 1)):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=terminate_when_both_sent, daemon=True).start()
    with pytest.raises(ranks.RanksInterrupted) as stop:
        ranks.spawn(_one_case_then_hang, tasks, {"marker": marker}, 2, "cpu", 300)
    assert stop.value.signum == signal.SIGTERM
    assert (stop.value.done, stop.value.total) == (1, 2)
    assert stop.value.rows == [{"rank": 0, "case": 0}, {"rank": 1, "case": 0}]


def test_an_interrupted_distributed_run_writes_what_finished(vocab_rows, tmp_path):
    import signal

    from lossreg.distributed_runs import _stopped
    from lossreg.ranks import RanksInterrupted
    from lossreg.runner import Interrupted

    with pytest.raises(Interrupted) as end:
        _stopped(RanksInterrupted(vocab_rows[:3], 3, 10, signal.SIGINT), tmp_path)
    assert (end.value.rows, end.value.done, end.value.total) == (3, 3, 10)
    assert end.value.signum == signal.SIGINT
    assert len(lossreg.load_results(end.value.location, strict=True)) == 3


class _Shown:
    def __init__(self, total):
        self.total, self.events = total, []

    def case_started(self, name):
        self.events.append(("started", name))

    def case_done(self, name, status):
        self.events.append((status, name))

    def close(self):
        self.events.append(("closed", None))


def test_progress_hears_of_each_case_once_every_rank_finished_it():
    from lossreg.distributed import check_distributed

    made = []
    check_distributed([toy_spec()], 2, dtypes=["float64"], impls=["right", "local_only"],
                      progress=lambda total: made.append(_Shown(total)) or made[-1])
    (shown,) = made
    done = [(s, n) for s, n in shown.events if s not in ("started", "closed")]
    assert shown.total == 2 and shown.events[-1] == ("closed", None)
    assert [s for s, _ in done] == ["ok", "fail"], shown.events
    assert all("x2 ranks" in n for _, n in done) and "right" in done[0][1]
