"""Lowering: from parsed recipes to a typed, hash-consed op graph, with every error collected.

Names resolve across `use`d recipes (with cycle detection); each binding is evaluated once, on demand,
in the scope of the recipe that wrote it, so relative paths mean the same from anywhere. Arithmetic
over models folds into one affine `Linear` value — a list of (leaf, coefficient) with exact fractional
coefficients — that becomes a `combine` node only where a model is needed: its coefficients must sum
to 1 (a model) or 0 (a delta). Calls are bound against the op's declared inputs and parameters.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from .. import exports
from ..artifacts import KINDS, exportable_kinds
from ..artifacts.onnx import ONNX_MODEL
from ..diagnostics import Diagnostics, Note, RecipeError
from ..ops import REGISTRY
from ..ops.arithmetic import FP32_MAX, Combine
from ..ops.export import Onnx
from ..ops.base import LINEAR, Context, Input, Op
from ..ops.sources import model_reference, nearest_directory
from ..source import Span
from ..store.cache import default_cache_dir
from ..store.hub import fetch_hint
from ..store.release_files import code_references_of
from ..syntax import ast, parse_file
from ..syntax.parser import MAX_MAGNITUDE
from ..ir.graph import ExportSpec, Graph, Node
from ..ir.types import Kind, Type

# --- values during lowering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scalar:
    value: Fraction


@dataclass(frozen=True)
class Text:
    value: str
    span: Span | None = field(default=None, compare=False)  # where the string was written


@dataclass(frozen=True)
class Flag:
    value: bool


@dataclass(frozen=True)
class Items:
    items: tuple[Value, ...]


@dataclass(frozen=True)
class Graphed:
    node: Node


@dataclass(frozen=True)
class Linear:
    """An affine combination sum(c_i * leaf_i) not yet turned into a node."""

    terms: tuple[tuple[Node, Fraction], ...]

    @property
    def weight_sum(self) -> Fraction:
        # A delta leaf contributes nothing to the sum: cp + 0.8*delta is still a model.
        return sum((c for n, c in self.terms if n.type.kind is Kind.MODEL), Fraction(0))


class Poison:
    """The value of an expression that already failed; using it reports nothing more."""


POISON = Poison()
Value = Scalar | Text | Flag | Items | Graphed | Linear | Poison


def _fmt(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    as_float = float(q)
    return repr(round(as_float, 6)) if Fraction(repr(as_float)) == q else f"{q.numerator}/{q.denominator}"


def _out_of_range(q: Fraction) -> bool:
    return abs(q) > MAX_MAGNITUDE or (q != 0 and abs(q) < 1 / MAX_MAGNITUDE)


def _magnitude(q: Fraction) -> str:
    """A number of any size in scientific notation (a float would overflow or flush to zero)."""
    exponent = math.floor(math.log10(abs(q.numerator)) - math.log10(q.denominator))
    mantissa = float(abs(q) / Fraction(10) ** exponent)
    return f"{'-' if q < 0 else ''}{mantissa:.2f}e{exponent:+d}"


def _closest(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(name: str, candidates) -> str | None:
    close = _closest(name, candidates)
    return f"did you mean `{close}`?" if close else None


# --- modules (one recipe file each) --------------------------------------------------------------------


@dataclass
class Module:
    path: Path
    recipe: ast.Recipe
    scope: dict[str, tuple[Module, ast.Assign]] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.path.parent


@dataclass
class Program:
    """The result of lowering: the graph, and what the CLI needs to report about it."""

    graph: Graph
    main: Module
    diagnostics: list  # warnings that did not stop lowering


class Lowerer:
    def __init__(self) -> None:
        self.diags = Diagnostics()
        self.graph = Graph()
        self.modules: dict[Path, Module] = {}
        self.values: dict[tuple[int, str], Value] = {}
        self.evaluating: set[tuple[int, str]] = set()

    # modules and scopes

    def load(self, path: Path, display: str | None = None, via: Span | None = None,
             stack: tuple[Path, ...] = ()) -> Module | None:
        path = path.resolve()
        if path in stack:
            cycle = " -> ".join(p.name for p in stack[stack.index(path):] + (path,))
            self.diags.error("E103", f"cyclic `use`: {cycle}", via, "move the shared definitions into a recipe "
                             "that both can `use`")
            return None
        if path in self.modules:
            return self.modules[path]
        try:
            recipe = parse_file(path, display)
        except RecipeError as err:
            self.diags.extend(err.diagnostics)
            return None
        except OSError as err:
            self.diags.error("E104", f"cannot read {display or path}: {err.strerror}", via, path=display)
            return None
        module = Module(path, recipe)
        self.modules[path] = module
        self._build_scope(module, stack + (path,))
        return module

    def _build_scope(self, module: Module, stack: tuple[Path, ...]) -> None:
        for stmt in module.recipe.statements:
            if isinstance(stmt, ast.Use):
                target = module.dir / stmt.path.value
                if not target.exists():
                    self.diags.error("E104", f"used recipe {stmt.path.value!r} not found (relative to {module.dir})",
                                     stmt.path.span, "paths in `use` are relative to the recipe that contains it")
                    continue
                refusal = _why_not_a_recipe(target)
                if refusal is not None:
                    self.diags.error("E109", f"cannot use {stmt.path.value!r}: {refusal}", stmt.path.span,
                                     "`use` takes another recipe: a UTF-8 `.rcp` file starting with `recipec 1`")
                    continue
                used = self.load(target, _display(target), stmt.span, stack)
                if used is None:
                    continue
                for name, entry in used.scope.items():
                    self._bind(module, name, entry)
        for stmt in module.recipe.statements:
            if isinstance(stmt, ast.Assign):
                self._bind(module, stmt.name.id, (module, stmt))

    def _bind(self, module: Module, name: str, entry: tuple[Module, ast.Assign]) -> None:
        previous = module.scope.get(name)
        if previous is not None and previous[1] is not entry[1]:
            self.diags.error("E102", f"`{name}` is bound twice", entry[1].name.span, "rename one of them",
                             [Note("first bound here", previous[1].name.span)])
            return
        module.scope[name] = entry

    # names

    def value_of(self, module: Module, name: ast.Name) -> Value:
        entry = module.scope.get(name.id)
        if entry is None:
            hint = _did_you_mean(name.id, module.scope) or (
                f"`{name.id}` is an op: call it, e.g. `{name.id}(...)`" if name.id in REGISTRY else
                _STATEMENTS.get(name.id) or f"bind it first: `{name.id} = ...`")
            self.diags.error("E101", f"unknown name `{name.id}`", name.span, hint)
            return POISON
        owner, assign = entry
        key = (id(owner), name.id)
        if key in self.values:
            return self.values[key]
        if key in self.evaluating:
            self.diags.error("E106", f"`{name.id}` is defined in terms of itself", name.span,
                             "break the cycle", [Note("defined here", assign.name.span)])
            return POISON
        self.evaluating.add(key)
        value = self.expr(owner, assign.value)
        self.evaluating.discard(key)
        if isinstance(value, Graphed) and name.id not in value.node.names:
            value.node.names.append(name.id)
        self.values[key] = value
        return value

    # expressions

    def expr(self, module: Module, e: ast.Expr) -> Value:
        if isinstance(e, ast.Number):
            return Scalar(e.value)
        if isinstance(e, ast.String):
            return Text(e.value, e.span)
        if isinstance(e, ast.Bool):
            return Flag(e.value)
        if isinstance(e, ast.Name):
            return self.value_of(module, e)
        if isinstance(e, ast.List):
            return Items(tuple(self.expr(module, item) for item in e.items))
        if isinstance(e, ast.Neg):
            return self._scale(module, self.expr(module, e.operand), Fraction(-1), e.operand, e)  # |x| unchanged
        if isinstance(e, ast.BinOp):
            return self._binop(module, e)
        if isinstance(e, ast.Call):
            return self.call(module, e)
        raise AssertionError(f"unhandled expression {e!r}")

    def _as_linear(self, module: Module, value: Value, e: ast.Expr) -> Linear | None:
        if isinstance(value, Linear):
            return value
        if isinstance(value, Graphed) and value.node.type.kind in (Kind.MODEL, Kind.DELTA):
            return Linear(((value.node, Fraction(1)),))
        if isinstance(value, Text):
            node = self._referenced(module, value, e)
            return Linear(((node, Fraction(1)),)) if node else None
        if not isinstance(value, Poison):
            self.diags.error("E302", f"cannot do model arithmetic with {_describe(value)}", e.span,
                             "only models and deltas add and subtract; numbers scale them")
        return None

    def _binop(self, module: Module, e: ast.BinOp) -> Value:
        return self._bounded(self._fold(module, e), e)

    def _bounded(self, value: Value, e: ast.Expr) -> Value:
        """Numbers and coefficients must stay representable as floats."""
        if isinstance(value, Scalar) and _out_of_range(value.value):
            self.diags.error("E302", f"this expression folds to {_magnitude(value.value)}, out of range", e.span,
                             "keep numbers between 1e-300 and 1e300 in magnitude")
            return POISON
        if isinstance(value, Linear):
            for leaf, c in value.terms:
                if _out_of_range(c):
                    self.diags.error(
                        "E302", f"folding this expression gives `{leaf.written_as}` the coefficient {_magnitude(c)}, "
                        "out of range", e.span,
                        "coefficients multiply through nested arithmetic (each `0.5*(...)` level halves them) and "
                        "must stay between 1e-300 and 1e300 in magnitude: write the final weights directly")
                    return POISON
        return value

    def _fold(self, module: Module, e: ast.BinOp) -> Value:
        left, right = self.expr(module, e.left), self.expr(module, e.right)
        if isinstance(left, Poison) or isinstance(right, Poison):
            return POISON
        if e.op in "*/":
            if e.op == "/":
                if not isinstance(right, Scalar):
                    self.diags.error("E302", f"can only divide by a number, not {_describe(right)}", e.right.span)
                    return POISON
                if right.value == 0:
                    self.diags.error("E302", "division by zero", e.right.span)
                    return POISON
                return self._scale(module, left, 1 / right.value, e.left, e)
            if isinstance(left, Scalar):
                return self._scale(module, right, left.value, e.right, e)
            if isinstance(right, Scalar):
                return self._scale(module, left, right.value, e.left, e)
            self.diags.error("E302", f"cannot multiply {_describe(left)} by {_describe(right)}", e.span,
                             "scale a model or a delta by a number: `0.8*(chat - base)`")
            return POISON
        sign = Fraction(1 if e.op == "+" else -1)
        if isinstance(left, Scalar) and isinstance(right, Scalar):
            return Scalar(left.value + sign * right.value)
        if isinstance(left, Scalar) or isinstance(right, Scalar):
            self.diags.error("E302", f"cannot {'add' if e.op == '+' else 'subtract'} a number "
                             f"{'to' if e.op == '+' else 'from'} a model", e.span,
                             "numbers scale models (`0.5*a`); they cannot be added to them")
            return POISON
        a, b = self._as_linear(module, left, e.left), self._as_linear(module, right, e.right)
        if a is None or b is None:
            return POISON
        terms: dict[Node, Fraction] = dict(a.terms)
        for node, c in b.terms:
            terms[node] = terms.get(node, Fraction(0)) + sign * c
        return Linear(tuple((n, c) for n, c in terms.items() if c != 0))

    def _scale(self, module: Module, value: Value, factor: Fraction, operand: ast.Expr, e: ast.Expr) -> Value:
        if isinstance(value, Poison):
            return POISON
        if isinstance(value, Scalar):
            return Scalar(value.value * factor)
        linear = self._as_linear(module, value, operand)
        if linear is None:
            return POISON
        return Linear(tuple((n, c * factor) for n, c in linear.terms if c * factor != 0))

    # models

    def _referenced(self, module: Module, value: Text, e: ast.Expr) -> Node | None:
        """The input node of a model reference string used as a model; named by the binding it came
        through (`base = "models/a"`: the plan and the lock call it `base`)."""
        node = self._reference(module, value.value, value.span or e.span)
        if node is not None and isinstance(e, ast.Name) and e.id not in node.names:
            node.names.append(e.id)
        return node

    def _reference(self, module: Module, text: str, span: Span) -> Node | None:
        ctx = Context(module.dir, self.diags, span)
        resolved = model_reference(ctx, text)
        if resolved is None:
            return None
        op, params = resolved
        return self._apply(op, [], params, ctx)

    def as_model(self, module: Module, value: Value, e: ast.Expr, allow_delta: bool = False) -> Node | None:
        """The node for a value used where a model is expected, or None after reporting why not."""
        if isinstance(value, Poison):
            return None
        if isinstance(value, Text):
            return self._referenced(module, value, e)
        if isinstance(value, Graphed) and value.node.type.kind is Kind.MODEL:
            return value.node
        if isinstance(value, Graphed) and value.node.type.kind is Kind.DELTA and allow_delta:
            return value.node
        if isinstance(value, Linear):
            if isinstance(e, ast.Name) and e.id in module.scope:
                # A name bound to an expression: the node is that binding's, named and located by it.
                owner, assign = module.scope[e.id]
                node = self.combine(owner, value, assign.value.span, {}, {}, allow_delta)
                if node is not None and e.id not in node.names:
                    node.names.append(e.id)
                return node
            return self.combine(module, value, e.span, {}, {}, allow_delta)
        if isinstance(value, Graphed) and value.node.type.kind is Kind.DELTA:
            self.diags.error("E206", "expected a model, got a delta", e.span,
                             "add the delta to a model: `model + delta`")
            return None
        self.diags.error("E206", f"expected a model, got {_describe(value)}", e.span,
                         "a model is a name bound to one, a model reference string, or an expression over models")
        return None

    def combine(self, module: Module, linear: Linear, span: Span, policy: dict[str, Any],
                arg_spans: dict[str, Span], allow_delta: bool = False) -> Node | None:
        """Check an affine combination's weights and make its `combine` node."""
        if not linear.terms:
            self.diags.error("E302", "the models in this expression cancel out", span,
                             "an expression like `a - a` is zero; remove it")
            return None
        total = linear.weight_sum
        if total not in (0, 1):
            self.diags.error("E301", f"model weights sum to {_fmt(total)}, not 1 (a model) or 0 (a delta)", span,
                             _sum_hint(linear))
            return None
        if total == 0 and not allow_delta:
            self.diags.error("E206", "expected a model, but these weights sum to 0: this is a delta", span,
                             "add the delta to a model: `model + k*(chat - base)`")
            return None
        if len(linear.terms) == 1 and linear.terms[0][1] == 1 and not policy:
            return linear.terms[0][0]
        leaves = [n for n, _ in linear.terms]
        params = {"coefficients": tuple(float(c) for _, c in linear.terms), **policy}
        as_computed = sum(float(c) for n, c in linear.terms if n.type.kind is Kind.MODEL)
        beyond_fp32 = any(abs(c) > FP32_MAX for c in params["coefficients"])  # the op's own E321 says so
        if abs(as_computed - float(total)) >= 1e-9 and not beyond_fp32:  # the op reads the kind from these floats
            self.diags.error("E321", f"model weights sum to {_fmt(total)}, but as the floating-point numbers the "
                             f"engine multiplies by they sum to {as_computed:g}: coefficients this large lose "
                             "their last digits", span,
                             "keep coefficients near 1: a large k in `a + k*(b - a)` cancels in the arithmetic, "
                             "and the result would be mostly rounding error")
            return None
        ctx = Context(module.dir, self.diags, span, {"expr": span, **arg_spans})
        return self._validated(Combine, leaves, params, ctx)

    # calls

    def call(self, module: Module, e: ast.Call) -> Value:
        name = e.func.id
        op = REGISTRY.get(name)
        if op is None:
            bound = name in module.scope
            hint = (f"`{name}` is a value, not an op" if bound
                    else _did_you_mean(name, REGISTRY) or "`recipec explain ops` lists the ops")
            self.diags.error("E201", f"unknown op `{name}`", e.func.span, hint)
            return POISON
        bound, bound_ok, meant = self._bind_arguments(op, e)
        ctx = Context(module.dir, self.diags, e.span, {k: v.span for k, v in bound.items()})
        inputs: list[Node] = []
        linear_input: Linear | None = None
        ok = True
        for inp in op.inputs:
            arg = bound.pop(inp.name, None)
            if isinstance(arg, ast.String) and inp.optional and inp.name in op.Params.model_fields:
                bound[inp.name] = arg  # an input that is also a parameter: a string is the parameter's (a path)
                arg = None
            ctx.given[inp.name] = arg is not None
            if arg is None and inp.optional:
                continue
            if arg is None:
                if not meant(inp.name):  # else most likely the argument misnamed or misplaced, reported so
                    self.diags.error("E204", f"`{name}` needs `{inp.name}`", e.span, f"pass {inp.doc or inp.name}")
                ok = False
                continue
            if inp.kind == LINEAR:
                value = self.expr(module, arg)
                linear = self._as_linear(module, value, arg)
                ok = ok and linear is not None
                linear_input = linear
                continue
            for item in (arg.items if inp.variadic and isinstance(arg, ast.List) else (arg,)):
                node = self._input(module, inp, item)
                ok = ok and node is not None
                inputs.append(node)
        raw: dict[str, Any] = {}
        arguments_ok = True
        for key, arg in bound.items():
            if isinstance(arg, ast.Name) and arg.id not in module.scope and arg.id in _choices(op, key):
                self.diags.error("E101", f"unknown name `{arg.id}`", arg.span,
                                 f"`{key}` takes a string: did you mean `{key}=\"{arg.id}\"`?")
                arguments_ok = False
                continue
            value = self.expr(module, arg)
            converted = _python(value)
            if converted is _NOT_A_PARAM:
                if not isinstance(value, Poison):
                    self.diags.error("E206", f"`{key}` takes a plain value, not {_describe(value)}", arg.span)
                arguments_ok = False
                continue
            raw[key] = converted
        if not (ok and arguments_ok and bound_ok):
            if arguments_ok and not any(inp.kind == LINEAR for inp in op.inputs):
                # An input failed (often upstream), or an argument could not be bound: the other arguments
                # are still checked, as they do not depend on it, so that every problem is reported at
                # once. What a misnamed argument leaves missing is that misnaming, already reported; and the
                # op's own checks across its arguments would judge the call without it, so they wait.
                params = self._params(op, raw, ctx, reported_missing=meant)
                if params is not None and bound_ok:
                    op.check_params(ctx, params)
            return POISON
        if linear_input is not None:
            node = self.combine(module, linear_input, e.span, raw, ctx.arg_spans, allow_delta=True)
            return Graphed(node) if node else POISON
        node = self._validated(op, inputs, raw, ctx)
        return Graphed(node) if node else POISON

    def _input(self, module: Module, inp: Input, arg: ast.Expr) -> Node | None:
        value = self.expr(module, arg)
        if inp.kind is Kind.MODEL:
            return self.as_model(module, value, arg)
        kinds = inp.kind if isinstance(inp.kind, tuple) else (inp.kind,)
        if isinstance(value, Graphed) and value.node.type.kind in kinds:
            return value.node
        if not isinstance(value, Poison):
            wanted = " or ".join(k.value for k in kinds)
            self.diags.error("E206", f"`{inp.name}` must be a {wanted}, got {_describe(value)}", arg.span)
        return None

    def _bind_arguments(self, op: type[Op], e: ast.Call) -> tuple[dict[str, ast.Expr], bool, Callable]:
        """Map a call's arguments to the op's input and parameter names, reporting misuse: (the arguments
        that could be bound, whether all could, whether a name that is missing may be what an argument
        without a place was meant to be: a misnamed keyword close to it, or any, for an extra positional)."""
        variadic = next((i for i in op.inputs if i.variadic), None)
        slots = [i.name for i in op.inputs if not i.optional] + list(op.positional)  # optional inputs by keyword
        fields = set(op.Params.model_fields) - getattr(op, "internal", frozenset())
        keyword_inputs = {i.name for i in op.inputs if i.optional}
        known = [i.name for i in op.inputs if not i.optional] + sorted(fields | keyword_inputs)
        bound: dict[str, ast.Expr] = {}
        ok = True
        meant: set[str] = set()  # what misnamed keywords are closest to
        extra = False  # a positional argument beyond the op's
        positional = list(e.args)
        if variadic is not None and positional:
            bound[variadic.name] = ast.List(tuple(positional), span=positional[0].span.to(positional[-1].span))
            positional = []
        for i, arg in enumerate(positional):
            if i >= len(slots):
                self.diags.error("E205", f"`{op.name}` takes {len(slots)} positional argument"
                                 f"{'s' if len(slots) != 1 else ''}, got {len(positional)}", arg.span,
                                 "name the remaining arguments: "
                                 + ", ".join(f"`{k}=`" for k in known if k not in slots)
                                 if len(known) > len(slots) else None)
                ok, extra = False, True
                break
            bound[slots[i]] = arg
        for kw in e.kwargs:
            if kw.name not in known:
                hint = _did_you_mean(kw.name, known) or (f"`{op.name}` takes " + ", ".join(f"`{k}`" for k in known))
                self.diags.error("E202", f"`{op.name}` has no parameter `{kw.name}`", kw.name_span, hint)
                ok = False
                meant.add(_closest(kw.name, known) or "")
            elif kw.name in bound:
                self.diags.error("E207", f"`{kw.name}` is given twice", kw.span,
                                 "pass each argument once, by position or by keyword")
                ok = False
            else:
                bound[kw.name] = kw.value
        return bound, ok, lambda name: extra or name in meant

    def _validated(self, op: type[Op], inputs: list[Node], raw: dict[str, Any], ctx: Context) -> Node | None:
        params = self._params(op, raw, ctx)
        return self._apply(op, inputs, params, ctx) if params is not None else None

    @staticmethod
    def _params(op: type[Op], raw: dict[str, Any], ctx: Context,
                reported_missing: Callable[[str], bool] = lambda name: False):
        """The op's validated `Params`, or None after reporting every argument that is wrong, and every one
        missing but those `reported_missing` (what a misnamed argument was meant to be, said already)."""
        try:
            return op.Params(**raw)
        except ValidationError as err:
            reported: set[str] = set()
            for problem in err.errors():
                name = str(problem["loc"][0]) if problem["loc"] else ""
                if problem["type"] == "missing" and reported_missing(name):
                    continue
                if name not in reported:  # one diagnostic per argument, however many items are wrong
                    reported.add(name)
                    _report_param_error(op, problem, raw, ctx)
            return None

    def _apply(self, op: type[Op], inputs: list[Node], params, ctx: Context) -> Node | None:
        errors_before = len(ctx.diags.errors)
        if not op.check_params(ctx, params):
            return None
        out: Type = op.output_type(ctx, inputs, params)
        if len(ctx.diags.errors) > errors_before or out.kind is Kind.ERROR:
            return None
        return self.graph.add(op.name, tuple(inputs), op.node_params(params, ctx), out, ctx.span)

    # statements

    def lower_main(self, module: Module) -> None:
        # Every binding of the main recipe is checked, used or not, in source order (so node ids, and
        # the plan, follow the recipe); `use`d recipes only as far as they are used.
        for owner, assign in list(module.scope.values()):
            if owner is module:
                value = self.value_of(module, assign.name)
                if isinstance(value, Graphed) and self._is_root(value.node):
                    self.graph.roots.append(value.node)
        written = [stmt for stmt in module.recipe.statements if isinstance(stmt, ast.Export)]
        exported = [(stmt, spec) for stmt in written if (spec := self._export(module, stmt)) is not None]
        self._check_targets(module, exported)

    def _is_root(self, node: Node) -> bool:
        """Whether `run` builds and shows a bound value though nothing exports it (a report)."""
        kind = KINDS.get(node.type.kind)
        return kind is not None and kind.root_when_bound and node not in self.graph.roots

    def referenced(self, module: Module) -> set[str]:
        """Every name any loaded recipe mentions: what is not in it is bound but unused."""
        names: set[str] = set()
        stack: list[Any] = list(module.recipe.statements)
        for other in self.modules.values():
            if other is not module:
                stack.extend(other.recipe.statements)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Assign):
                stack.append(node.value)
            elif isinstance(node, ast.Export):
                stack.append(node.value)
            elif isinstance(node, ast.Call):
                stack.extend(node.args)
                stack.extend(kw.value for kw in node.kwargs)
            elif isinstance(node, ast.BinOp):
                stack.extend((node.left, node.right))
            elif isinstance(node, ast.Neg):
                stack.append(node.operand)
            elif isinstance(node, ast.List):
                stack.extend(node.items)
        return names

    def _export(self, module: Module, stmt: ast.Export) -> ExportSpec | None:
        """An export of any value whose artifact kind accepts the format asked for (artifacts/); a model
        exported as ONNX becomes an `onnx` node first, built and cached like any other."""
        asked = stmt.format.id if stmt.format else None
        known = sorted({f for kind in KINDS.values() for f in kind.formats})
        problem = exports.format_problem(stmt.path.value, asked, known)
        if problem is not None:
            self.diags.error(problem.code, problem.message, stmt.format.span if asked else stmt.path.span,
                             problem.hint)
            return None
        fmt = asked or exports.suffix_format(stmt.path.value)
        value = self.expr(module, stmt.value)
        if isinstance(value, Graphed) and value.node.type.kind is Kind.DELTA or (
                isinstance(value, Linear) and value.terms and value.weight_sum == 0):
            if fmt == "onnx":
                self.diags.error("E466", "cannot export a delta as ONNX: it is a difference between models, "
                                 "not a model that runs", stmt.value.span,
                                 "add it to a model first: `export base + delta to \"out/m.onnx\"`")
            else:
                self.diags.error("E305", "cannot export a delta: it is a difference between models, not a model",
                                 stmt.value.span, "add it to a model first: `export base + delta to ...`")
            return None
        if isinstance(value, Graphed) and value.node.type.kind is not Kind.MODEL:
            node = value.node
        else:  # a model, a model reference, an affine combination, or something that is none of those
            node = self.as_model(module, value, stmt.value)
        if node is None:
            return None
        if fmt == "onnx" and node.type.kind is Kind.MODEL:
            node = self._onnx_of(module, node, stmt)
            if node is None:
                return None
        kind = KINDS.get(node.type.kind)
        if fmt == "onnx" and node.type.kind is not ONNX_MODEL:
            noun = kind.noun if kind else "a " + node.type.kind.value
            self.diags.error("E466", f"cannot export {noun} as ONNX: only a model has an ONNX graph",
                             stmt.value.span, f"export it to a directory: `export {stmt.value.span.text} to \"out/name\"`")
            return None
        if kind is None or not kind.formats:
            self.diags.error("E305", f"cannot export {kind.noun if kind else 'a ' + node.type.kind.value}: "
                             "it is not a result that can be released", stmt.value.span,
                             "export takes " + ", ".join(exportable_kinds()))
            return None
        fmt = fmt or kind.formats[0]
        if fmt not in kind.formats:
            where = stmt.format.span if stmt.format else stmt.path.span
            self.diags.error("E305", f"export format `{fmt}` is not supported for {kind.noun}", where,
                             f"{kind.noun} is exported as " + " or ".join(f"`{f}`" for f in kind.formats)
                             + ", to a directory: `export x to \"out/name\"`")
            return None
        spec = ExportSpec(node, (module.dir / stmt.path.value).resolve(), fmt, stmt.span, stmt.path.value)
        self.graph.exports.append(spec)
        return spec

    def _onnx_of(self, module: Module, model: Node, stmt: ast.Export) -> Node | None:
        """The `onnx` node of a model an export writes as ONNX, named after the model (`m.onnx`) in the plan
        and the lock."""
        ctx = Context(module.dir, self.diags, stmt.value.span)
        node = self._apply(Onnx, [model], Onnx.Params(), ctx)
        name = f"{model.label}.onnx"
        if node is not None and name not in node.names:
            node.names.append(name)
        return node

    def _check_targets(self, module: Module, exported: list[tuple[ast.Export, ExportSpec]]) -> None:
        """Every export target against every place it must not destroy, and against each other."""
        used = [path for path in self.modules if path != module.path]
        places = exports.recipe_places(module.path, used, default_cache_dir(module.path))
        for node in self.graph.nodes:
            places += exports.input_places(node.op, node.label, node.params, module.dir)
        valid: list[tuple[ast.Export, ExportSpec]] = []
        for stmt, spec in exported:
            self._warn_code_references(module, stmt, spec)
            problem = exports.written_problem(stmt.path.value) or next(
                filter(None, (exports.place_problem(spec.path, stmt.path.value, p) for p in places)), None)
            if problem is not None:
                self.diags.error(problem.code, problem.message, stmt.path.span, problem.hint)
            elif not self._overlaps(stmt, spec, valid):
                valid.append((stmt, spec))

    def _overlaps(self, stmt: ast.Export, spec: ExportSpec, earlier: list[tuple[ast.Export, ExportSpec]]) -> bool:
        """Whether an export's target is, or overlaps, an earlier export's; reports it if so."""
        for other_stmt, other in earlier:
            note = [Note("first exported here", other_stmt.path.span)]
            if other.path == spec.path:
                self.diags.error("E306", f"two exports write {stmt.path.value!r}", stmt.path.span,
                                 "give each export its own path", note)
                return True
            problem = exports.overlap_problem(stmt.path.value, spec.path, other_stmt.path.value, other.path)
            if problem is not None:
                self.diags.error(problem.code, problem.message, stmt.path.span, problem.hint, note)
                return True
        return False

    def _warn_code_references(self, module: Module, stmt: ast.Export, spec: ExportSpec) -> None:
        """Say which code references a release will lose (they are removed when it is written)."""
        if exports.keeps_code_references(spec.node):
            return
        for leaf in exports.leaves(spec.node):
            model_dir = exports.input_dir(leaf.op, leaf.params, module.dir)
            for config, keys in code_references_of(model_dir):
                self.diags.warning("E313", f"the release drops {', '.join(f'`{k}`' for k in keys)} from "
                                   f"{exports.shown(model_dir / config, module.dir)}: references to code that "
                                   "recipec does not ship", stmt.path.span,
                                   "to keep them, load the model with `remote_code=true`")


_NOT_A_PARAM = object()


def _choices(op: type[Op], name: str) -> tuple[str, ...]:
    """The strings a parameter accepts when its type is a Literal (optional or not), else ()."""
    info = op.Params.model_fields.get(name)
    if info is None:
        return ()
    literals = [info.annotation] + list(get_args(info.annotation))
    return tuple(v for t in literals if get_origin(t) is Literal for v in get_args(t) if isinstance(v, str))


def _python(value: Value) -> Any:
    """The plain Python value pydantic validates, or _NOT_A_PARAM for graph values."""
    if isinstance(value, Scalar):
        q = value.value
        return q.numerator if q.denominator == 1 else float(q)
    if isinstance(value, Text | Flag):
        return value.value
    if isinstance(value, Items):
        items = [_python(v) for v in value.items]
        return _NOT_A_PARAM if any(i is _NOT_A_PARAM for i in items) else items
    return _NOT_A_PARAM


def _describe(value: Value) -> str:
    if isinstance(value, Scalar):
        return f"a number ({_fmt(value.value)})"
    if isinstance(value, Text):
        return f"a string ({value.value!r})"
    if isinstance(value, Flag):
        return "a boolean"
    if isinstance(value, Items):
        return "a list"
    if isinstance(value, Graphed):
        return f"a {value.node.type.kind.value.lower()}"
    if isinstance(value, Linear):
        return "a model expression"
    return "an invalid value"


def _sum_hint(linear: Linear) -> str:
    n = len(linear.terms)
    if all(c == 1 for _, c in linear.terms) and n > 1:
        return f"average them: `({' + '.join(t.label for t, _ in linear.terms)})/{n}`, or add a delta: `a + (b - base)`"
    return "scale the weights to sum to 1 (a model), or subtract a base so they sum to 0 (a delta)"


_RANGE_KEYS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def _range_of(op: type[Op], name: str) -> str | None:
    info = op.Params.model_fields.get(name)
    if info is None:
        return None
    bounds = {}
    for meta in info.metadata:
        for key in _RANGE_KEYS:
            if getattr(meta, key, None) is not None:
                bounds[key] = getattr(meta, key)
    lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    key = next(iter(bounds), None)
    return f"{_RANGE_KEYS[key]} {bounds[key]}" if key else None


# Words that begin a statement, met where a value is expected (`m = export`): what the statement looks like.
_STATEMENTS = {"export": '`export` is a statement of its own: `export VALUE to "path"`',
               "use": '`use` is a statement of its own: `use "other.rcp"` brings in its definitions',
               "recipec": "`recipec 1` is the recipe's first line, not a value"}


def _report_param_error(op: type[Op], problem: dict, raw: dict[str, Any], ctx: Context) -> None:
    name = str(problem["loc"][0]) if problem["loc"] else None
    kind = problem["type"]
    info = op.Params.model_fields.get(name) if name else None
    hint = f"`{name}` is {info.description}" if info is not None and info.description else None
    value = raw.get(name)
    if len(problem["loc"]) > 1:  # an element of a list argument: name that element, not the list
        value = problem.get("input")
        ctx.error("E206", f"`{name}{''.join(f'[{i}]' for i in problem['loc'][1:])}` must be "
                  f"{_EXPECTED.get(kind) or problem['msg'].replace('Input should be ', '')}, "
                  f"got {_describe_raw(value)}", name, hint)
        return
    if kind == "missing":
        ctx.error("E204", f"`{op.name}` needs `{name}`", hint=hint)
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        ctx.error("E203", f"`{name}` must be {_range_of(op, name)}, got {value!r}", name, hint)
    elif kind == "value_error":
        ctx.error("E203", f"`{name}`: {problem['msg'].removeprefix('Value error, ')}", name, hint)
    elif kind == "literal_error":
        ctx.error("E203", f"`{name}` must be {problem['ctx']['expected']}, got {value!r}", name, hint)
    else:
        expected = _EXPECTED.get(kind) or problem["msg"].replace("Input should be ", "")
        ctx.error("E206", f"`{name}` must be {expected}, got {_describe_raw(value)}", name, hint)


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
             "bool_type": "true or false", "list_type": "a list", "tuple_type": "a list"}


def _describe_raw(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


_HEADER = re.compile(rb"\A(?:\xef\xbb\xbf)?(?:[ \t]*(?:#[^\n]*)?\r?\n)*recipec[ \t]")


def _why_not_a_recipe(path: Path) -> str | None:
    """Why a `use` target is not a recipe, judged without echoing any of it; None when it is one."""
    if path.is_dir():
        return "it is a directory, not a recipe"
    if path.suffix != ".rcp":
        return "it is not a recipe (recipes end in .rcp)"
    try:
        data = path.read_bytes()
    except OSError:
        return None  # loading it reports why it cannot be read
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    return None if _HEADER.match(data) else "it does not start with `recipec 1`"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def lower_file(path: Path) -> Program:
    """Parse, resolve and type-check a recipe; raises RecipeError with every error found."""
    lowerer = Lowerer()
    module = lowerer.load(path, _display(path))
    if module is not None:
        lowerer.lower_main(module)
    lowerer.diags.raise_if_errors()
    assert module is not None
    for node in lowerer.graph.reachable():
        if node.op == "hf" and node.type.signature is None:
            repo_id, revision = node.params["id"], node.params.get("revision")
            span = node.spans[0] if node.spans else None
            message = (f"hub model {repo_id}@{revision or 'main'} is not in the local Hugging Face cache: its "
                       "signature and costs are unknown until it is fetched")
            # A bare string whose first folder is not beside the recipe reads as a hub id: a mistyped
            # local path would otherwise only fail when run, offline or at the hub.
            local = (nearest_directory(module.dir, repo_id)
                     if span is not None and not span.text.startswith("hf(") else None)
            if local is not None:
                lowerer.diags.warning("E408", message, span, f"did you mean the local directory {local!r}? A "
                                      "string whose first folder is not beside the recipe is read as a hub id")
            else:
                lowerer.diags.note("E408", message, span, fetch_hint(repo_id, revision, _display(path)))
    referenced = lowerer.referenced(module)
    shown = {name for node in lowerer.graph.roots for name in node.names}
    for name, (owner, assign) in module.scope.items():
        if owner is module and name not in referenced and name not in shown:
            lowerer.diags.warning("E105", f"`{name}` is never used or exported", assign.name.span,
                                  f"export it (`export {name} to \"out/{name}\"`) or remove it")
    return Program(lowerer.graph, module, lowerer.diags.items)
