"""medseg's packages form layers (docs/extending.md, ARCHITECTURE): a module imports only from its own layer or the
layers below, lazy imports inside functions included, and the packages' import graph has no cycle. ``medseg report``
reads JSON and draws figures without loading torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

MEDSEG = Path(__file__).resolve().parents[1] / "medseg"

#: The layers, lowest first; a unit is a top-level module or package of medseg.
LAYERS: dict[str, int] = {
    **dict.fromkeys(("__init__", "errors", "fsutil", "progress", "threads", "registry", "device", "lean_imports"), 0),
    "config": 1,
    "io": 2,
    **dict.fromkeys(("plan", "transforms"), 3),
    **dict.fromkeys(("models", "losses", "metrics"), 4),
    **dict.fromkeys(("training", "inference", "qc"), 5),
    **dict.fromkeys(("reporting", "tracking", "deploy", "pacs"), 6),
    **dict.fromkeys(("cli", "workflow", "sample_data", "__main__", "lightning"), 7),
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(root: Path) -> dict[tuple[str, str], list[str]]:
    """``{(importing unit, imported unit): [file:line, ...]}`` over every ``import``/``from ... import`` in the
    tree, at module level or inside functions."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        me = rel.parts[0] if rel.parts[0] != "__init__" or len(rel.parts) > 1 else "__init__"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                if target == root.name or target.startswith(root.name + "."):
                    unit = _unit(target)
                    if unit != me and unit in LAYERS:
                        edges.setdefault((me, unit), []).append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return edges


def violations(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """Upward imports, and cycles between units (each reported once)."""
    found = [f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]}) at {', '.join(sorted(set(w))[:3])}"
             for (a, b), w in sorted(edges.items()) if LAYERS.get(b, 0) > LAYERS.get(a, 0)]
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    cycles = set()
    for start in graph:
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.add(tuple(sorted(path)))
                elif nxt not in path:
                    stack.append((nxt, (*path, nxt)))
    return found + [f"import cycle through {' -> '.join(c)}" for c in sorted(cycles)]


def test_every_unit_has_a_layer():
    units = {p.relative_to(MEDSEG).with_suffix("").parts[0] for p in MEDSEG.rglob("*.py")}
    assert units - set(LAYERS) == set(), "give new modules a layer in tests/test_layers.py (and docs/extending.md)"


def test_no_upward_import_and_no_cycle():
    assert violations(imports(MEDSEG)) == []


def test_the_check_finds_a_planted_upward_import_and_a_cycle(tmp_path: Path):
    planted = tmp_path / "medseg"
    for name, text in {
        "io/reader.py": "def read():\n    from medseg.training.trainer import fit  # lazy, still upward\n",
        "training/trainer.py": "from medseg.inference import predictor\n",
        "inference/predictor.py": "import medseg.training.trainer\n",
        "config.py": "import os\n",
    }.items():
        (planted / name).parent.mkdir(parents=True, exist_ok=True)
        (planted / name).write_text(text)
    found = violations(imports(planted))
    assert any(v.startswith("io (layer 2) imports training (layer 5)") for v in found), found
    assert "import cycle through inference -> training" in found, found


def test_report_runs_without_torch(tmp_path: Path):
    """``medseg report`` of an evaluation and of a prediction folder in a fresh process: no torch, no MONAI."""
    from medseg.io.nifti import write_nifti
    from medseg.io.volume import Volume
    from medseg.metrics.evaluate import evaluate_folders
    from medseg.reporting.report import write_overlays

    mask = np.zeros((1, 12, 12, 6), np.uint8)
    mask[0, 3:9, 3:9, 1:5] = 1
    for folder in ("pred", "ref"):
        write_nifti(Volume(mask, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / folder / "case.nii.gz")
    evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", labels={1: "organ"})
    write_overlays(tmp_path / "eval", tmp_path / "pred", tmp_path / "ref")
    (tmp_path / "pred" / "manifest.json").write_text('{"model": ["m"], "cases": [{"case_id": "case", "status": "ok"}]}')
    script = textwrap.dedent(f"""
        import sys
        from medseg.cli import main
        for target in ({str(tmp_path / "eval")!r}, {str(tmp_path / "pred")!r}):
            sys.argv = ["medseg", "report", target]
            try:
                main()
            except SystemExit as exit:
                assert not exit.code, exit.code
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "monai"}}))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "pred" / "review.html").is_file()
