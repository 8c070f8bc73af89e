"""The import graph, read from the code's own imports (module level and inside functions): no cycle, and no arrow
from a lower layer to a higher one. Layers, lowest first:

  0  base      errors, io, seeding, progress
  1  core      dist, pictures, optim, ema, the kernels package
  2  library   config, models, diffusion, vae, data, metrics, artifacts, run_folder, hub, transfer, official, engine,
               sampling, restoration, evaluation
  3  stages    the Stage contract, the registry, run_stage
  4  front     cli, demo, train, __main__
  5  benchmarks
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"usp_fast": ROOT / "usp_fast", "usp_fast_kernels": ROOT / "kernels",
            "usp_fast_benchmarks": ROOT / "benchmarks"}
LAYERS = [
    ("usp_fast.errors", "usp_fast.io", "usp_fast.seeding", "usp_fast.progress"),
    ("usp_fast", "usp_fast.dist", "usp_fast.pictures", "usp_fast.optim", "usp_fast.ema", "usp_fast_kernels"),
    ("usp_fast.config", "usp_fast.models", "usp_fast.diffusion", "usp_fast.vae", "usp_fast.data", "usp_fast.metrics",
     "usp_fast.artifacts", "usp_fast.run_folder", "usp_fast.hub", "usp_fast.transfer", "usp_fast.official", "usp_fast.engine",
     "usp_fast.sampling", "usp_fast.restoration", "usp_fast.evaluation"),
    ("usp_fast.stages",),
    ("usp_fast.cli", "usp_fast.demo", "usp_fast.train", "usp_fast.__main__"),
    ("usp_fast_benchmarks",),
]
# the one allowed upward arrow: `usp-fast bench` is the command line's door to the benchmarks package
ALLOWED_UPWARD = {("usp_fast.cli", "usp_fast_benchmarks.run")}


def modules():
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [pkg, *f.relative_to(folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph():
    mods = modules()
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here[: len(here) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # a name inside a module -> the module
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges[m].add(t)
    return edges


def layer(module):
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_higher_layer():
    edges = import_graph()
    unplaced = sorted(m for m in edges if layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    upward = sorted((a, b) for a, targets in edges.items() for b in targets
                    if layer(b) > layer(a) and (a, b) not in ALLOWED_UPWARD)
    assert not upward, upward


def test_the_checker_sees_cycles_and_upward_arrows():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer("usp_fast.models.dit") == 2 and layer("usp_fast.stages.generate") == 3 and layer("usp_fast") == 1
    edges = import_graph()
    assert "usp_fast.models.layers" in edges["usp_fast.models.dit"]  # relative imports resolve
    assert "usp_fast.config" in edges["usp_fast.stages.pretrain"]


def test_stages_start_only_through_run_stage():
    """No module above the stages builds argv for the command line or drives a Stage's run() itself."""
    for m, f in modules().items():
        if m in ("usp_fast.cli", "usp_fast.stages"):
            continue
        text = f.read_text()
        assert 'main(["train"' not in text and "cli.main(" not in text, m
        assert ".run(resume=" not in text, m
