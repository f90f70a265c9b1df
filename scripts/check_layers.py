"""Check the layer rule of the package (issue 17, DESIGN.md): a module imports only from its own
package or a lower layer, and packages of one layer do not import each other.

    python scripts/check_layers.py          # prints each violation; exit 1 if any

Every import counts, also those inside functions (they run too). The table below is the one in
the README's pipeline section.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "datasetdm"

# unit (top-level module or package under datasetdm) -> layer
LAYERS: dict[str, int] = {
    "errors": 0, "io": 0, "text": 0, "progress": 0, "config": 0,
    "formats": 1,
    "world": 2, "backbone": 2, "prompts": 2,
    "decoder": 3,
    "training": 4, "labelers": 4,
    "generation": 5,
    "evaluation": 6,
    "embedded": 7,
    # apps: may import anything
    "cli": 99, "demo": 99, "view": 99, "__init__": 99, "__main__": 99,
}
APP_MODULE_NAMES = {"cli"}  # a package's cli.py belongs to the apps layer
TESTING = "testing"  # tiny models for tests and benches: never imported by product code


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("datasetdm")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("datasetdm"):
            found.append((node.lineno, node.module))
            # `from datasetdm import decoder` names a package too
            if node.module == "datasetdm":
                found += [(node.lineno, f"datasetdm.{a.name}") for a in node.names]
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        unit = unit_of(module) if len(rel.parts) > 1 else "__init__"
        if unit == TESTING or path.stem == TESTING:
            continue
        if unit not in LAYERS:
            problems.append(f"{path}: package {unit!r} has no layer in scripts/check_layers.py")
            continue
        is_app = LAYERS[unit] == 99 or path.stem in APP_MODULE_NAMES
        for line, target in imports_of(path):
            other = unit_of(target)
            where = f"{path.relative_to(PACKAGE.parent.parent)}:{line}"
            if TESTING in target.split("."):
                problems.append(f"{where}: product code imports {target} (test helpers)")
                continue
            if target.split(".")[-1] in APP_MODULE_NAMES and not is_app:
                problems.append(f"{where}: {unit} (layer {LAYERS[unit]}) imports the app module {target}")
                continue
            if other == unit or other == "__init__" and target == "datasetdm" or other == "errors":
                continue  # the one error type is below everything
            if other not in LAYERS:
                continue  # a module that does not exist: the import fails in tests
            if is_app:
                continue
            if LAYERS[other] == 99:
                problems.append(f"{where}: {unit} (layer {LAYERS[unit]}) imports the app module {target}")
            elif LAYERS[other] > LAYERS[unit]:
                problems.append(f"{where}: {unit} (layer {LAYERS[unit]}) imports {target} (layer {LAYERS[other]})")
            elif LAYERS[other] == LAYERS[unit]:
                problems.append(f"{where}: {unit} imports {target}, a package of its own layer {LAYERS[unit]}")
    return problems


def main() -> int:
    problems = violations()
    for p in problems:
        print(p)
    print(f"{len(problems)} layer violations" if problems else "layer rule holds")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
