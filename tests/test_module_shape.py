"""The shape of metering_processor.py that keeps it readable: each section (the numbered
banners, listed in the map at the top) uses only names defined in it or before it, and no
function grows past 70 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import metering_processor as mp

SOURCE = Path(mp.__file__).read_text()
TREE = ast.parse(SOURCE)
BANNERS = [(number, int(match.group(1)), match.group(2)) for number, line in enumerate(SOURCE.splitlines(), 1)
           for match in [re.match(r"^# (\d+)\. (.+)$", line)] if match]


def section_of(line: int) -> int:
    return max((section for start, section, _ in BANNERS if start <= line), default=0)


def test_the_sections_are_numbered_in_order_and_mapped_at_the_top():
    assert [section for _, section, _ in BANNERS] == list(range(1, len(BANNERS) + 1))
    assert len(BANNERS) >= 8
    for _, section, _ in BANNERS:
        assert re.search(rf"^ *{section}\. ", mp.__doc__, re.M), f"section {section} is not in the map"


def test_no_section_uses_a_name_defined_in_a_later_one():
    """Every top-level name (function, class, constant) and every use of one, annotations
    included: a use in section N of a name first defined in a section after N is a defect."""
    defined: dict[str, int] = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            names = []
        for name in names:
            defined.setdefault(name, section_of(node.lineno))
    assert len(defined) > 300
    later = [(node.lineno, use.id, section_of(node.lineno), defined[use.id])
             for node in TREE.body for use in ast.walk(node)
             if isinstance(use, ast.Name) and isinstance(use.ctx, ast.Load) and use.id in defined and defined[use.id] > section_of(node.lineno)]
    assert later == []


def test_no_function_is_longer_than_70_lines():
    lengths = {f"{node.name} (line {node.lineno})": node.end_lineno - node.lineno + 1
               for node in ast.walk(TREE) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {name: length for name, length in lengths.items() if length > 70} == {}
