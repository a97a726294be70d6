"""Post-processing of generated Python code as EvalPlus does it (``evalplus.sanitize.sanitize``).

The Qwen2.5-Coder instruct evaluation scores a completion only after EvalPlus's sanitizer has cut it down to
the longest syntactically valid block of lines and then to the imports plus the top-level definitions the
entry point reaches. EvalPlus walks a tree-sitter parse; this module applies the same rules to Python's own
``ast`` (the syntax check EvalPlus uses is ``ast.parse`` too), so no native parser is needed:

* imports are all kept; classes are kept; functions are kept only when they contain a ``return`` and are not
  decorated (a decorated function is a different tree-sitter node type, which EvalPlus skips); top-level
  assignments ``name = ...`` are kept; the first definition of a name wins;
* with an entry point, only definitions reachable from it through the identifiers they mention survive;
* output = imports, then the surviving definitions, in source order, joined by newlines.
"""

from __future__ import annotations

import ast


def syntax_ok(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):
        return False
    return True


def code_extract(text: str) -> str:
    """The longest run of lines (by non-blank line count) that parses, first such run on ties."""
    if syntax_ok(text):
        return text  # the whole text is the longest valid run; only trailing blank lines could differ
    lines = text.split("\n")
    best, best_len = (0, 0), 0
    for i in range(len(lines)):
        for j in range(i + 1, len(lines)):
            chunk = lines[i:j + 1]
            n = sum(1 for line in chunk if line.strip())
            if n > best_len and syntax_ok("\n".join(chunk)):
                best_len, best = n, (i, j)
    return "\n".join(lines[best[0]:best[1] + 1])


def _identifiers(node: ast.AST) -> set[str]:
    """Every identifier inside ``node`` (tree-sitter's ``identifier`` leaves: names, attributes, params)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.keyword) and n.arg:
            out.add(n.arg)
    return out


def _has_return(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) for n in ast.walk(node))


def _assigned_name(node: ast.stmt) -> str | None:
    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
    return target.id if isinstance(target, ast.Name) else None


def sanitize(code: str, entrypoint: str | None = None) -> str:
    """EvalPlus's sanitizer on ``code``: the imports and the definitions reachable from ``entrypoint``."""
    code = code_extract(code)
    try:
        tree = ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):
        return ""
    seen: set[str | None] = set()
    imports: list[ast.stmt] = []
    defs: list[tuple[str | None, ast.stmt]] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                imports.append(node)
        elif isinstance(node, ast.ClassDef) and not node.decorator_list:
            if node.name not in seen:
                defs.append((node.name, node))
                seen.add(node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            if node.name not in seen and _has_return(node):
                defs.append((node.name, node))
                seen.add(node.name)
        elif isinstance(node, ast.Assign) or (isinstance(node, ast.AnnAssign) and node.value is not None):
            name = _assigned_name(node)
            if name not in seen:
                defs.append((name, node))
                seen.add(name)
    keep = None
    if entrypoint:
        deps = {name: _identifiers(node) for name, node in defs}
        keep, queue = {entrypoint}, [entrypoint]
        while queue:
            for nxt in deps.get(queue.pop(0), ()):
                if nxt not in keep:
                    keep.add(nxt)
                    queue.append(nxt)
    parts = [ast.get_source_segment(code, n) for n in imports]
    parts += [ast.get_source_segment(code, n) for name, n in defs if keep is None or name in keep]
    return "\n".join(p for p in parts if p is not None)
