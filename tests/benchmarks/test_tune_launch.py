"""benchmarks/tune_launch.py without a GPU: the timing is faked (each candidate's cost a function of the launch
config the op would use), so the table it writes can be checked: an entry per (op, D, dtype, shape class), written
as soon as it is measured, kept by a run that is stopped, and found again by the kernels' lookup for launches of
that shape class only."""
import json
import time

import pytest
import torch

from usp_fast_benchmarks import tune_launch
import usp_fast_kernels._triton_utils as tu

BEST = {32: (8, 16), 256: (4, 4)}  # (warps, programs per SM) the fake timing favours, by batch


def _fake(calls, stop_after=None):
    def make_op(name, B, T, D, dtype):
        return (name, B, D, dtype)

    def measure(forward, which, reps):
        name, B, D, dtype = forward
        calls.append((name, B, which))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt  # a run stopped by the GPU check's timeout
        cfg = tu.launch_config(f"{name}/{which}", D, dtype, 1024, rows=B * tune_launch.TOKENS)
        warps, per_sm = BEST[B]
        return 1.0 + abs(cfg["num_warps"] - warps) + abs(cfg["programs_per_sm"] - per_sm)

    return make_op, measure


def _table(path, monkeypatch):
    table = tu._launch_table.__wrapped__(path)
    monkeypatch.setattr(tu, "_launch_table", lambda: table)


def test_entries_are_keyed_by_shape_class_and_found_only_for_it(tmp_path, monkeypatch):
    out = tmp_path / "launch_table.json"
    make_op, measure = _fake(calls := [])
    tune_launch.tune(out, batches=(32, 256), widths=(1152,), dtypes=("bf16",), ops=("ln_modulate",),
                     make_op=make_op, measure=measure, device="fake")
    entries = json.loads(out.read_text())["entries"]
    assert {(e["op"], e["rows"]) for e in entries} == {(f"ln_modulate/{w}", r) for w in ("fwd", "bwd")
                                                       for r in (32 * 256, 256 * 256)}
    for e in entries:
        assert (e["num_warps"], e["programs_per_sm"]) == BEST[e["shape"][0]]
    _table(out, monkeypatch)
    bwd = lambda rows: tu.launch_config("ln_modulate/bwd", 1152, torch.bfloat16, 1024, rows=rows)  # noqa: E731
    assert (bwd(32 * 256)["num_warps"], bwd(32 * 256)["programs_per_sm"]) == (8, 16)
    assert (bwd(256 * 256)["num_warps"], bwd(256 * 256)["programs_per_sm"]) == (4, 4)
    assert bwd(33 * 256)["num_warps"] == 8  # same power-of-two class as 32 x 256
    assert bwd(64 * 256)["source"] == "heuristic"  # a class nobody tuned
    assert bwd(None)["source"] == "heuristic"  # no rows given and two classes: ambiguous
    assert tu.launch_config("ln_modulate/bwd", 1152, torch.float32, 1024, rows=32 * 256)["source"] == "heuristic"


def test_a_stopped_run_keeps_each_entry_it_finished_and_merges_into_the_file(tmp_path, monkeypatch):
    out = tmp_path / "launch_table.json"
    out.write_text(json.dumps({"entries": [{"op": "gate_residual/fwd", "D": 768, "dtype": "fp32",
                                            "num_warps": 2, "programs_per_sm": 2, "measured_on": "old"}]}))
    per_direction = 1 + len(tune_launch.WARPS) * len(tune_launch.PROGRAMS_PER_SM)
    make_op, measure = _fake([], stop_after=3 * per_direction + 1)  # dies inside the 4th direction
    with pytest.raises(KeyboardInterrupt):
        tune_launch.tune(out, batches=(32, 256), widths=(1152,), dtypes=("bf16",), ops=("ln_modulate",),
                         make_op=make_op, measure=measure, device="fake")
    entries = json.loads(out.read_text())["entries"]
    assert [(e["op"], e.get("rows")) for e in entries] == [
        ("gate_residual/fwd", None), ("ln_modulate/fwd", 8192), ("ln_modulate/bwd", 8192), ("ln_modulate/fwd", 65536)]
    _table(out, monkeypatch)  # a class-free (older) entry still serves every shape
    assert tu.launch_config("gate_residual/fwd", 768, torch.float32, 512, rows=12345)["source"] == "old"
    # one class only, and a caller that passes no rows: that entry (the lookup before shape classes)
    assert tu.launch_config("ln_modulate/bwd", 1152, torch.bfloat16, 1024)["num_warps"] == 8


def test_a_budget_stops_before_a_group_that_would_not_fit(tmp_path):
    """Each fake timing sleeps 1 ms, so a group (42 timings) lasts >= 42 ms: the first starts inside a 50 ms
    budget, the second would end past it (>= 84 ms) however slow the machine."""
    out = tmp_path / "launch_table.json"
    make_op, fast = _fake(calls := [])

    def measure(*args):
        time.sleep(0.001)
        return fast(*args)

    entries = tune_launch.tune(out, batches=(32, 256), widths=(1152,), dtypes=("bf16",), ops=("ln_modulate",),
                               budget_s=0.05, make_op=make_op, measure=measure, device="fake")
    assert {e["rows"] for e in entries} == {8192} and {b for _, b, _ in calls} == {32}
