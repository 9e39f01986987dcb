"""Size expressions in blueprints: arithmetic over the host's `in`/`out` and the blueprint's params.

A blueprint is data, never code, so sizes are parsed by a whitelist over Python's AST: numbers,
names, + - * / //, unary minus, min() and max(). Nothing is evaluated by Python itself.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping

from esper.exceptions import BlueprintSpecError

MAX_EXPR_LENGTH = 80
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
}
_FUNCS = {"min": min, "max": max}
# `in` (the host's input width) is a Python keyword: it is renamed before parsing.
_IN = re.compile(r"\bin\b")
_IN_NAME = "in_"


def _rename(name: str) -> str:
    return _IN_NAME if name == "in" else name


def parse_size(expr: int | str, names: set[str]) -> ast.Expression | None:
    """Check `expr` is a legal size expression over `names`; None for a plain integer."""
    if isinstance(expr, bool):
        raise BlueprintSpecError(f"size {expr!r} is not a number or an expression")
    if isinstance(expr, int):
        if expr < 1:
            raise BlueprintSpecError(f"size {expr} must be ≥ 1")
        return None
    if len(expr) > MAX_EXPR_LENGTH:
        raise BlueprintSpecError(f"size expression longer than {MAX_EXPR_LENGTH} characters")
    names = {_rename(n) for n in names}
    try:
        tree = ast.parse(_IN.sub(_IN_NAME, expr), mode="eval")
    except SyntaxError as err:
        raise BlueprintSpecError(f"size {expr!r} is not an expression: {err.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load | ast.USub) or type(node) in _BINOPS:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            continue
        if isinstance(node, ast.Name):
            if node.id in _FUNCS or node.id in names:
                continue
            known = ", ".join(sorted("in" if n == _IN_NAME else n for n in names))
            raise BlueprintSpecError(f"size {expr!r} names {node.id!r}; known names: {known}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and node.args
            and not node.keywords
        ):
            continue
        raise BlueprintSpecError(
            f"size {expr!r}: {type(node).__name__} is not allowed "
            "(numbers, names, + - * / //, min(), max())"
        )
    return tree


def eval_size(expr: int | str, env: Mapping[str, float]) -> int:
    """The size as an integer: rounded down, and never below 1."""
    tree = parse_size(expr, set(env))
    if tree is None:
        return int(expr)
    value = _eval(tree.body, {_rename(k): v for k, v in env.items()})
    if not math.isfinite(value):
        raise BlueprintSpecError(f"size {expr!r} is not finite for {dict(env)}")
    return max(1, math.floor(value))


def _eval(node: ast.AST, env: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # parse_size admits no other constant
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(env[node.id])
    if isinstance(node, ast.UnaryOp):
        return -_eval(node.operand, env)
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Div | ast.FloorDiv) and right == 0:
            raise BlueprintSpecError("size expression divides by zero")
        return float(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        return float(_FUNCS[node.func.id]([_eval(a, env) for a in node.args]))  # max(x) is x
    raise BlueprintSpecError(f"cannot evaluate {type(node).__name__}")
