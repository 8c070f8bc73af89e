"""The benchmarks package's import rules, by an AST scan: no import cycle inside benchmarks/, no benchmark drives
usp-fast through its command line or demo (they call the library: usp_fast.stages.run_stage, usp_fast.sampling),
and the library never imports the benchmarks (only the `usp-fast bench` launcher in usp_fast/cli.py does)."""
import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def _imported(path):
    """Every module name a file imports, at any depth (lazy imports included); `from a import b` gives a and a.b."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _benchmark_deps():
    """benchmarks module stem -> the benchmarks modules it imports."""
    stems = {p.stem for p in BENCH.glob("*.py")}
    return {p.stem: {n.split(".")[1] for n in _imported(p) if n.startswith("usp_fast_benchmarks.")
                     and n.split(".")[1] in stems} - {p.stem} for p in BENCH.glob("*.py")}


def test_no_import_cycle_inside_benchmarks():
    deps, done = _benchmark_deps(), set()

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module not in done:
            for dep in deps[module]:
                visit(dep, path + [module])
            done.add(module)

    for module in deps:
        visit(module, [])


def test_benchmarks_call_the_library_not_the_command_line():
    hits = [f"{p.name}: {n}" for p in BENCH.glob("*.py") for n in _imported(p)
            if n.split(".")[:2] in (["usp_fast", "cli"], ["usp_fast", "demo"])]
    assert not hits, hits


def test_the_library_does_not_import_the_benchmarks():
    hits = [str(p.relative_to(REPO)) for p in (REPO / "usp_fast").rglob("*.py")
            if any(n.startswith("usp_fast_benchmarks") for n in _imported(p))]
    assert set(hits) <= {"usp_fast/cli.py"}, hits  # cli.py: `usp-fast bench` launches benchmarks/run.py


def test_kernel_thresholds_live_in_targets_yaml_only():
    """Every op of the kernels suite has speed targets in targets.yaml, and no benchmark module holds its own."""
    from usp_fast_benchmarks import kernel_suite

    bounds = yaml.safe_load((BENCH / "targets.yaml").read_text())["_kernels"]
    assert set(bounds["max_rel_error_vs_eager"]) == {"bfloat16", "float16", "float32"}
    ops = {"keep_gather", "unshuffle", "patch_norm_mse", "ln_modulate", "gate_residual", "gate_residual_ln_modulate"}
    assert set(bounds["speed"]) == ops
    assert all(set(t) <= set(kernel_suite.BASELINE_OF_TARGET) | {"hbm_bw_fraction"}
               for t in bounds["speed"].values())
    stale = [p.name for p in BENCH.glob("*.py") if "KERNEL_TARGETS" in p.read_text() or
             "ERROR_TOLERANCE" in p.read_text()]
    assert not stale, stale
