"""Legibility figures of the package (issue 28), from the ``ast`` of every module -> JSON.

- functions with more than 7 parameters (``self``/``cls`` not counted; ``*args``/``**kw`` count one);
- modules importing more than 8 distinct persrep modules (module- and function-level, TYPE_CHECKING too);
- the longest function (lines);
- import cycles between persrep modules, counting every import (TYPE_CHECKING and function-level included);
- ``duplicates`` pairs over ``persrep/`` when the tool is on PATH.

    python bench/code_metrics.py --label before --out bench/code_metrics.json
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "persrep"
sys.path.insert(0, str(REPO / "tests"))
from test_layers import strongly_connected  # noqa: E402 - the layer test's Tarjan, one body


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    mod = module_name(path)
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(mod, node, path.name == "__init__.py")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            # the longest persrep module the name lies in (``from persrep.x import y`` -> persrep.x or persrep.x.y)
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != mod and n.startswith("persrep") and n != "persrep":
                out.add(n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default=str(REPO / "bench" / "code_metrics.json"))
    args = ap.parse_args()
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in files}
    # a package's import of its own submodule is not a dependency on another module
    graph = {module_name(p): imports_of(p, modules) for p in files}
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m + ".").startswith(d + ".")}  # parent packages' __init__
    many_params, longest = [], ("", 0)
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
                n = len([x for x in names if x not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)
                where = f"{p.relative_to(REPO)}:{node.lineno} {node.name}"
                if n > 7:
                    many_params.append(f"{where} ({n})")
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > longest[1]:
                    longest = (where, length)
    heavy = sorted(((m, len(d)) for m, d in graph.items() if len(d) > 8), key=lambda x: -x[1])
    dup = None
    if shutil.which("duplicates"):
        text = subprocess.run(["duplicates", "--repo", str(PKG), "--most", "200", "--seconds", "120"],
                              capture_output=True, text=True).stdout
        dup = {"pairs": sum(1 for ln in text.splitlines() if ln.startswith("D")), "first_line": text.splitlines()[0]}
    entry = {"functions_over_7_params": len(many_params), "functions_over_7_params_list": many_params,
             "modules_importing_over_8_persrep_modules": len(heavy),
             "modules_importing_over_8_list": [f"{m} ({n})" for m, n in heavy],
             "longest_function": {"where": longest[0], "lines": longest[1]},
             "import_cycles_incl_type_checking": strongly_connected(graph), "duplicates": dup,
             "modules": len(files), "lines": sum(len(p.read_text().splitlines()) for p in files)}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc[args.label] = entry
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in entry.items() if not k.endswith("_list")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
