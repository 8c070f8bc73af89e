"""Progress bars that suit where the output goes: a live tqdm bar on a terminal; without one (a log file, CI) a
line at most every LOG_INTERVAL seconds, so `make demo > log` holds a few progress lines, not one per step."""
import os
import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines when no terminal is attached


def on_terminal(stream=None):
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class _Lines:
    """A stream for tqdm off a terminal: each refresh (tqdm starts it with a carriage return) becomes one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """tqdm with the project's defaults; `disable=True` (e.g. ranks other than 0) turns it off. Update the postfix
    with refresh=False: off a terminal the bar then writes only every LOG_INTERVAL seconds."""
    stream = kwargs.pop("file", None) or sys.stderr
    live = on_terminal(stream)
    kwargs.setdefault("dynamic_ncols", live)
    if not live:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL * 4)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, file=stream if live else _Lines(stream), **kwargs)
