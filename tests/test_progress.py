"""Progress bars off a terminal: a line at most every LOG_INTERVAL seconds, never one per update."""
import io

from usp_fast import progress


def test_off_a_terminal_the_bar_writes_sparse_whole_lines(monkeypatch):
    out = io.StringIO()  # not a tty: a log file, CI
    clock = iter(range(0, 100_000))  # tqdm's clock: one second per reading
    monkeypatch.setattr("tqdm.std.time", lambda: next(clock))
    bar = progress.progress_bar(total=1000, desc="train", file=out)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="0.1", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and all(line.startswith("train") for line in lines)
    # the first line, then at most one every LOG_INTERVAL seconds of the clock, then the last
    assert 2 <= len(lines) <= next(clock) // progress.LOG_INTERVAL + 3 < 1000 // 10, len(lines)
    assert "1000/1000" in lines[-1]


def test_on_a_terminal_the_bar_is_live(monkeypatch):
    out = io.StringIO()
    out.isatty = lambda: True
    monkeypatch.delenv("CI", raising=False)
    bar = progress.progress_bar(total=3, desc="t", file=out)
    assert bar.fp is not None and progress.on_terminal(out) and bar.mininterval < progress.LOG_INTERVAL
    bar.close()
