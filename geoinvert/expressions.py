"""Safe spatial functions f(x, y) from data: numbers, named shapes and a small expression language.

Nothing in a case file is ever executed as Python. An expression string is parsed with
:mod:`ast` and only a whitelist of node types is accepted (numbers, the coordinates ``x`` and
``y``, the constants ``pi`` and ``e``, arithmetic, comparisons and a fixed set of numpy
functions); evaluation walks that tree with numpy. ``^`` means power, as users write it.

Examples of specs::

    1.0
    "exp(-((x - 0.5)^2 + (y - 0.3)^2) / 0.02)"
    {"shape": "gaussian", "center": [0.5, 0.3], "width": 0.1, "amplitude": 2.0}
    [{"shape": "gaussian", "center": [0.5, 0.3], "width": 0.1},
     {"shape": "gaussian", "center": [0.5, 0.7], "width": 0.1}]      # a list is a sum
"""

import ast
import operator

import numpy as np

__all__ = ["compile_spec", "describe_spec", "SHAPES", "FUNCTIONS"]

FUNCTIONS = {
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "exp": np.exp, "log": np.log,
    "sqrt": np.sqrt, "abs": np.abs, "tanh": np.tanh, "sinh": np.sinh, "cosh": np.cosh,
    "arctan": np.arctan, "atan2": np.arctan2, "min": np.minimum, "max": np.maximum,
    "where": np.where, "heaviside": lambda t: np.heaviside(t, 0.5),
}
_CONSTANTS = {"pi": np.pi, "e": np.e}
_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_COMPARE = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_MAX_LENGTH = 2000


def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _point(value, what):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{what} must be a pair [x, y], got {value!r}")
    return tuple(_number(v, what) for v in value)


def _positive(value, what):
    v = _number(value, what)
    if v <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return v


def _gaussian(center, width, amplitude=1.0):
    (cx, cy), w, a = _point(center, "center"), _positive(width, "width"), _number(amplitude, "amplitude")
    return lambda x, y: a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * w * w))


def _box(x, y, value=1.0):
    (x0, x1), (y0, y1), v = _point(x, "x"), _point(y, "y"), _number(value, "value")
    return lambda xx, yy: v * ((xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1))


def _constant(value):
    v = _number(value, "value")
    return lambda x, y: np.full(np.broadcast(x, y).shape, v)


def _sines(kx=1, ky=1, amplitude=1.0):
    a, fx, fy = _number(amplitude, "amplitude"), _number(kx, "kx"), _number(ky, "ky")
    return lambda x, y: a * np.sin(fx * np.pi * x) * np.sin(fy * np.pi * y)


SHAPES = {
    "gaussian": (_gaussian, "exp(-|s - center|^2 / (2 width^2)) * amplitude"),
    "box": (_box, "value inside [x0, x1] x [y0, y1], 0 outside"),
    "constant": (_constant, "value everywhere"),
    "sines": (_sines, "amplitude * sin(kx pi x) * sin(ky pi y)"),
}


def _check(node):
    """Reject every node outside the whitelist (raises ValueError)."""
    if isinstance(node, ast.Expression):
        return _check(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed as literals, got {node.value!r}")
        return
    if isinstance(node, ast.Name):
        if node.id not in ("x", "y") and node.id not in _CONSTANTS:
            raise ValueError(f"unknown name {node.id!r} (allowed: x, y, pi, e)")
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _check(node.left), _check(node.right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(node.operand)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        return [_check(n) for n in [node.left, *node.comparators]]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id not in FUNCTIONS:
            raise ValueError(
                f"unknown function {node.func.id!r} (allowed: {', '.join(sorted(FUNCTIONS))})")
        return [_check(a) for a in node.args]
    raise ValueError(f"syntax not allowed in an expression: {ast.unparse(node)!r}")


def _evaluate(node, x, y):
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return {"x": x, "y": y}[node.id] if node.id in ("x", "y") else _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, x, y), _evaluate(node.right, x, y))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, x, y))
    if isinstance(node, ast.Compare):
        left, result = _evaluate(node.left, x, y), True
        for op, comp in zip(node.ops, node.comparators):
            right = _evaluate(comp, x, y)
            result = result & _COMPARE[type(op)](left, right)
            left = right
        return result
    return FUNCTIONS[node.func.id](*(_evaluate(a, x, y) for a in node.args))


def _compile_expression(text):
    if len(text) > _MAX_LENGTH:
        raise ValueError(f"expression longer than {_MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse expression {text!r}: {err.msg}") from None
    _check(tree)
    body = tree.body

    def f(x, y):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        with np.errstate(all="ignore"):
            value = _evaluate(body, x, y)
        return np.broadcast_to(np.asarray(value, dtype=float), np.broadcast(x, y).shape).copy()

    return f


def _compile_shape(spec):
    spec = dict(spec)
    name = spec.pop("shape", None)
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r} (allowed: {', '.join(sorted(SHAPES))})")
    factory = SHAPES[name][0]
    try:
        return factory(**spec)
    except TypeError:
        keys = factory.__code__.co_varnames[:factory.__code__.co_argcount]
        raise ValueError(
            f"shape {name!r} takes the keys {', '.join(keys)}; got {', '.join(sorted(spec))}"
        ) from None


def compile_spec(spec):
    """Turn a spec (number, expression string, named shape or list of those) into ``f(x, y)``.

    Args:
        spec: ``float``, expression ``str``, ``{"shape": name, ...}`` or a list of specs (summed).

    Returns:
        A function of numpy arrays ``x, y`` (same shape) returning an array of that shape.

    Raises:
        ValueError: naming what is wrong with the spec.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return _constant(spec)
    if isinstance(spec, str):
        return _compile_expression(spec)
    if isinstance(spec, dict):
        return _compile_shape(spec)
    if isinstance(spec, (list, tuple)) and spec:
        parts = [compile_spec(s) for s in spec]
        return lambda x, y: sum(p(x, y) for p in parts)
    raise ValueError(f"expected a number, an expression string or a shape, got {spec!r}")


def describe_spec(spec):
    """A short human-readable description of a spec, for summaries and netCDF attributes."""
    if isinstance(spec, dict):
        args = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "shape")
        return f"{spec.get('shape')}({args})"
    if isinstance(spec, (list, tuple)):
        return " + ".join(describe_spec(s) for s in spec)
    return str(spec)
