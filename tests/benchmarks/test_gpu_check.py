"""benchmarks/gpu_check.sh on a CPU, with a fake benchmarks CLI (RUN=) in place of run.py so that each step case
takes a fraction of a second: each case's rows reach OUT as soon as the case ends; a hanging case is killed at its
own timeout and the next one runs (a results file it left half-written is replaced by OUT's last good copy); OUT
holds at most 8 files (none of run.py's charts) even after `kill -9` of the script mid-case; the commit passed in
(no .git) is what the results record. The real CPU dry run (tiny cases through run.py, `STAGES=env,steps,kernels,
check`) takes minutes here, so it is run by hand, not in CI."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
NAMES = {"summary.txt", "full.log", "cpu-fake.json", "launch_table.json", "kernels-junit.xml", "correctness.json"}

FAKE_RUN = r'''
import json, sys, time
from pathlib import Path
args = sys.argv[1:]
if "--check" in args:
    print("check: fake verdict"); sys.exit(0)
out = Path(args[args.index("--out") + 1]); out.mkdir(parents=True, exist_ok=True)
case = args[args.index("--cases") + 1].strip("^$") if "--cases" in args else "kernels"
if "hang" in case:
    time.sleep(120)
path = out / "cpu-fake.json"
record = json.loads(path.read_text()) if path.exists() else {"device": "cpu-fake", "suites": {"steps": {"rows": {}}}}
if "torn" in case:  # killed in the middle of writing the results file
    path.write_text(json.dumps(record)[:20]); time.sleep(120)
record["commit"] = __import__("os").environ.get("USP_FAST_COMMIT")
record["suites"]["steps"]["rows"][case + "/usp-fast"] = {"step_ms": 1.0}
path.write_text(json.dumps(record))
(out / "cpu-fake-steps.png").write_bytes(b"png"); (out / "README.md").write_text("index")  # as write_charts does
'''


def _start(tmp_path, cases, stages="steps,check", **env):
    """The script from a copy of benchmarks/ outside any git checkout, as on the GPU machine (.git stays behind)."""
    fake = tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)
    (tmp_path / "repo" / "benchmarks").mkdir(parents=True, exist_ok=True)
    script = tmp_path / "repo" / "benchmarks" / SCRIPT.name
    script.write_text(SCRIPT.read_text())
    out = tmp_path / "out"
    env = {**os.environ, "RUN": f"{sys.executable} {fake}", "PYTHON": sys.executable, "STAGES": stages,
           "CASES": cases, "WORK": str(tmp_path / "work"), **env}
    proc = subprocess.Popen(["bash", str(script), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, out


def _files(out):
    return {p.name for p in out.iterdir()}


def test_each_case_is_published_as_it_ends_and_a_case_killed_mid_write_loses_only_itself(tmp_path):
    proc, out = _start(tmp_path, "first:1 torn:1 last:1", COMMIT="0123abc")  # torn: killed at 3 x 1 s
    text, _ = proc.communicate(timeout=60)
    summary = (out / "summary.txt").read_text()
    assert re.search(r"steps first: exit 0", summary) and re.search(r"steps torn: exit 124", summary), summary
    assert re.search(r"steps last: exit 0", summary) and "check: fake verdict" in summary, summary
    record = json.loads((out / "cpu-fake.json").read_text())
    assert set(record["suites"]["steps"]["rows"]) == {"first/usp-fast", "last/usp-fast"}
    assert record["commit"] == "0123abc"  # passed in: a carried copy has no .git
    assert _files(out) <= NAMES and len(_files(out)) <= 8, _files(out)  # run.py's charts and README stay in WORK


def test_at_most_8_files_and_the_finished_rows_survive_kill_9_mid_case(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "commit.txt").write_text("4567def\n")  # what the lead writes before carrying
    proc, out = _start(tmp_path, "first:1 hang:30 last:1", stages="steps", COMMIT="")
    try:
        deadline = time.monotonic() + 30
        while "=== steps hang" not in ((out / "full.log").read_text() if (out / "full.log").exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the hanging case never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the script itself, mid-case; its children live on a moment
        proc.wait(timeout=10)
        time.sleep(0.5)
        files = _files(out)
        assert files <= NAMES | {".publish.tmp"} and len(files) <= 8, files
        record = json.loads((out / "cpu-fake.json").read_text())
        assert set(record["suites"]["steps"]["rows"]) == {"first/usp-fast"} and record["commit"] == "4567def"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_plan_fits_its_budget():
    """The estimates in the script's `stage` calls: everything up to the check within BUDGET_S with a margin, each
    estimate under its own timeout, and the header's total the sum of the script's estimates."""
    text = SCRIPT.read_text()
    budget = int(re.search(r"BUDGET_S=\$\{BUDGET_S:-(\d+)\}", text).group(1))
    calls = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^stage (\w+) (\d+) (\d+) ", text, re.M)}
    assert all(est < limit for est, limit in calls.values()), calls
    cases = re.search(r'CASES=\$\{CASES:-"(.*?)"\}', text, re.S).group(1).replace("\\\n", " ").split()
    steps = sum(int(c.rsplit(":", 1)[1]) for c in cases)
    headline = sum(calls[s][0] for s in ("env", "install", "tune", "kernels", "correctness", "check")) + steps
    assert headline <= 0.8 * budget, headline
    assert re.search(rf"= {headline} s of the {budget} s budget", text), "header arithmetic out of date"
    at = lambda line: re.search(rf"^{re.escape(line)}", text, re.M).start()  # noqa: E731
    assert at("stage tune") < at('selected steps && step_cases steps "$CASES"')  # its table is read by the steps
    assert at("selected steps") < at("stage kernels") < at("stage correctness") < at("stage check") < at("stage engine")


def test_results_record_the_commit_passed_in_outside_git(tmp_path, monkeypatch):
    from usp_fast_benchmarks import env

    monkeypatch.setattr(env, "REPO", tmp_path)  # no .git here, as on the GPU machine
    monkeypatch.setenv("USP_FAST_COMMIT", "feedbeef")
    assert env.git_commit() == {"commit": "feedbeef", "dirty": None}
    monkeypatch.delenv("USP_FAST_COMMIT")
    assert env.git_commit() == {"commit": None, "dirty": None}


def test_the_resume_check_allows_run_to_run_noise_but_not_a_shifted_loss(tmp_path):
    """The engine stage's comparison of a resumed run with a straight one (the Python inside gpu_check.sh)."""
    code = re.search(r"\$PY - \"\$runs\" <<'EOF' \|\| return 1\n(.*?)\nEOF", SCRIPT.read_text(), re.S).group(1)
    (tmp_path / "check.py").write_text(code)

    def verdict(straight, resumed):
        for name, losses in (("straight", straight), ("resumed", resumed)):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "metrics.jsonl").write_text("".join(
                json.dumps({"step": 10 * (i + 1), "loss": v}) + "\n" for i, v in enumerate(losses)))
        return subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path)], capture_output=True,
                              text=True).returncode

    a = [1.0, 0.9, 0.8, 0.7]  # windows at steps 10..40; the stop is at 20
    assert verdict(a, a) == 0
    assert verdict(a, [1.0, 0.9, 0.803, 0.7]) == 0     # 0.4%: within 2^-7
    assert verdict(a, [1.0, 0.9, 0.82, 0.7]) == 1      # 2.4% after the stop, no noise before it
    assert verdict(a, [1.01, 0.9, 0.82, 0.7]) == 0     # the same, with 1% run-to-run noise seen before the stop
    assert verdict(a, [1.0, 0.9, 0.8]) == 1            # a window missing
