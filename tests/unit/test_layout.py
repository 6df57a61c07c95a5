"""The import rules of DESIGN.md, checked on the source: which part may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["epurse", "wire", "blacklist", "hardware_sim", "validator", "backoffice", "clearing", "reports", "farebox"]
ALLOWED = {
    "epurse": set(),
    "wire": set(),
    "blacklist": set(),
    "clearing": set(),
    "reports": {"clearing"},
    "hardware_sim": {"epurse", "validator", "wire", "blacklist"},
    "validator": {"epurse", "wire", "blacklist"},
    "backoffice": {"epurse", "wire", "blacklist", "clearing", "reports"},
    "farebox": set(PARTS),
}


def imported_parts(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PARTS)
    return found


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_what_it_may(part):
    for path in sorted((ROOT / part).rglob("*.py")):
        wrong = imported_parts(path) - ALLOWED[part] - {part}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}; {part} may import {sorted(ALLOWED[part])}"
