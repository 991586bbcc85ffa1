"""A compiler for the FHIRPath subset of FHIR R4 SearchParameter expressions.

Every search parameter names the values it indexes with a FHIRPath expression (R4
SearchParameter.expression), e.g. `Observation.subject.where(resolve() is Patient)` or
`(Observation.value as Quantity) | (Observation.value as SampledData)`. Interpreting FHIRPath on
every write would dominate ingest time, so each expression is compiled once, for one resource
type, into a chain of closures that walk the resource's JSON directly.

The compiler is statically typed: from the R4 StructureDefinitions (`data/paths-r4.json.gz`, built
by `scripts/build_fhir_paths.py`) it knows the FHIR type of the element each step reaches, so it
never inspects JSON shapes at run time to guess a type. A compiled expression is a list of
*branches*, each a function producing JSON values of one known FHIR type (and, for a `code`
element whose required binding draws on one code system, that system); a choice element
without a type (`Observation.value`, R4 formats.html#choice, `value[x]`) forks into one branch
per allowed type, and `as`/`ofType`/`is` are decided per branch at compile time. Union branches
rooted at another resource type (shared expressions such as `AllergyIntolerance.code |
Condition.code | ...`) are dropped.

Supported (FHIRPath N1 as profiled by R4 search parameters): paths, choice elements (also named
with their type, `Extension.valueDateTime`), `|`, `and`, `or`, `=`, `!=`, `is`, `as`,
string/boolean/number literals, `$this`, `[n]`, and the functions `where`, `exists`, `empty`,
`first`, `as`, `ofType`, `is` and `resolve` — the last only as `resolve() is Type`, decided from
the reference's own text (`Type/id`, `[base]/Type/id[/_history/v]`) or, for a logical reference,
its `type`, since the index cannot fetch targets. Two deliberate departures from strict FHIRPath,
both what R4 search expressions rely on: `as` applies item by item (like `ofType`) instead of
failing on a collection, and a type test matches the exact type only (`ConceptMap.source as uri`
must not select `sourceCanonical`). Anything else makes the expression uncompilable
(`compile_expression` returns None), so the parameter is reported as unsupported rather than
indexed wrongly. Extractors expect structurally valid R4 JSON (validation runs first); on
malformed JSON they may raise AttributeError/TypeError, which the indexer contains.

Public API: `compile_expression` (cached; None if unsupported), `compile_strict` (raises
`FHIRPathUnsupported` saying why), `Extractor` (callable: resource -> [(value, FHIR type)], with
its typed `branches`), `reference_type`, `resource_types`.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeAlias

#: A FHIRPath collection: JSON values (dicts for complex types, str/bool/int/float for primitives).
Values: TypeAlias = list[Any]
#: One branch of a compiled expression: the input collection -> the values it selects.
BranchFn: TypeAlias = Callable[[Values], Values]
#: What an Extractor returns: each value with its FHIR type name.
Node: TypeAlias = tuple[Any, str]

#: Static type of the output of `resolve()`: the values are the target resource type names.
_RESOLVED = "@resolved"
_RESOURCE_BASES = frozenset({"Resource", "DomainResource"})


class FHIRPathUnsupported(ValueError):
    """The expression uses FHIRPath this compiler does not implement (or is not valid here)."""


@dataclass(frozen=True, slots=True)
class Branch:
    fn: BranchFn
    type: str
    #: set when the branch is just `input.key` (lets `where(key = 'x')` test the key directly)
    key: str | None = None
    #: for a `code` element with a required binding to the codes of one code system, that system
    #: (the token search index's system for its values, R4 search.html#token)
    system: str | None = None


@dataclass(frozen=True, slots=True)
class Extractor:
    """A compiled expression for one resource type. Call it with the resource's JSON."""

    expression: str
    resource_type: str
    #: (function of `[resource]`, FHIR type of every value it returns), in expression order
    branches: tuple[Branch, ...]

    def __call__(self, resource: Mapping[str, Any]) -> list[Node]:
        root = [resource]
        return [(v, b.type) for b in self.branches for v in b.fn(root)]

    @property
    def types(self) -> frozenset[str]:
        """Every FHIR type the expression can produce for this resource type."""
        return frozenset(b.type for b in self.branches)


# ---- the R4 type map -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TypeMap:
    #: owner (type name or backbone path) -> element name (`value[x]` for choices) -> type(s)
    elements: Mapping[str, Mapping[str, str | list[str]]]
    base: Mapping[str, str]
    #: `owner.element` of a `code` element -> the code system its required binding implies
    systems: Mapping[str, str]

    def is_a(self, type_name: str, wanted: str) -> bool:
        t: str | None = type_name
        while t is not None:
            if t == wanted:
                return True
            t = self.base.get(t)
        return False


@functools.cache
def _type_map() -> _TypeMap:
    blob = resources.files("fhirgate.fhirserver").joinpath("data/paths-r4.json.gz").read_bytes()
    data = json.loads(gzip.decompress(blob))
    return _TypeMap(elements=data["types"], base=data["base"], systems=data["systems"])


@functools.cache
def resource_types() -> frozenset[str]:
    """The R4 resource types (and the abstract Resource and DomainResource)."""
    tm = _type_map()
    return frozenset(t for t in tm.elements if tm.is_a(t, "Resource"))


# ---- lexer and parser (FHIRPath N1 grammar, §4 "Expressions" / Appendix "Grammar") ---------------

_TOKEN_RE = re.compile(
    r"""\s*(?:
      (?P<str>'(?:[^'\\]|\\.)*')
    | (?P<num>\d+(?:\.\d+)?)
    | (?P<op>!=|!~|<=|>=|[.|()\[\],=~<>+\-*/&])
    | (?P<id>[A-Za-z_][A-Za-z0-9_]*|`[^`]*`|\$this|%[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass(frozen=True, slots=True)
class _Ident:
    name: str


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Any
    type: str


@dataclass(frozen=True, slots=True)
class _Member:
    target: Any
    name: str


@dataclass(frozen=True, slots=True)
class _Call:
    target: Any  # None: invoked on the input collection ($this)
    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Index:
    target: Any
    index: int


@dataclass(frozen=True, slots=True)
class _Binary:
    op: str
    left: Any
    right: Any


@dataclass(frozen=True, slots=True)
class _TypeOp:
    op: str  # "is" | "as"
    target: Any
    type_name: str


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None or m.end() == pos:
            raise FHIRPathUnsupported(f"cannot read {text[pos : pos + 20]!r}")
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def _unquote(literal: str) -> str:
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", _unescape, literal[1:-1])


def _unescape(m: re.Match[str]) -> str:
    s = m.group(1)
    if s[0] == "u" and len(s) == 5:
        return chr(int(s[1:], 16))
    return _ESCAPES.get(s, s)


class _Parser:
    """Recursive descent over FHIRPath's precedence levels (lowest first): implies; or/xor; and;
    in/contains; = != ~ !~; < > <= >=; |; is/as; + - &; * /; unary; invocation."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise FHIRPathUnsupported("unexpected end of expression")
        self.pos += 1
        return tok

    def accept(self, value: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[1] == value and tok[0] in ("op", "id"):
            self.pos += 1
            return True
        return False

    def expect(self, value: str) -> None:
        if not self.accept(value):
            raise FHIRPathUnsupported(f"expected {value!r} at {self.peek()!r}")

    def parse(self) -> Any:
        node = self.expr()
        if self.peek() is not None:
            raise FHIRPathUnsupported(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> Any:
        return self.implies()

    def implies(self) -> Any:
        node = self.or_()
        while self.accept("implies"):
            node = _Binary("implies", node, self.or_())
        return node

    def or_(self) -> Any:
        node = self.and_()
        while True:
            tok = self.peek()
            if tok is not None and tok[0] == "id" and tok[1] in ("or", "xor"):
                self.pos += 1
                node = _Binary(tok[1], node, self.and_())
            else:
                return node

    def and_(self) -> Any:
        node = self.membership()
        while self.accept("and"):
            node = _Binary("and", node, self.membership())
        return node

    def membership(self) -> Any:
        node = self.equality()
        tok = self.peek()
        if tok is not None and tok[0] == "id" and tok[1] in ("in", "contains"):
            raise FHIRPathUnsupported(f"operator {tok[1]!r}")
        return node

    def equality(self) -> Any:
        node = self.inequality()
        while True:
            tok = self.peek()
            if tok is not None and tok[0] == "op" and tok[1] in ("=", "!=", "~", "!~"):
                self.pos += 1
                node = _Binary(tok[1], node, self.inequality())
            else:
                return node

    def inequality(self) -> Any:
        node = self.union()
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] in ("<", ">", "<=", ">="):
            raise FHIRPathUnsupported(f"operator {tok[1]!r}")
        return node

    def union(self) -> Any:
        node = self.type_op()
        while self.accept("|"):
            node = _Binary("|", node, self.type_op())
        return node

    def type_op(self) -> Any:
        node = self.additive()
        while True:
            tok = self.peek()
            if tok is not None and tok[0] == "id" and tok[1] in ("is", "as"):
                self.pos += 1
                node = _TypeOp(tok[1], node, self.type_name())
            else:
                return node

    def type_name(self) -> str:
        kind, name = self.take()
        if kind != "id":
            raise FHIRPathUnsupported(f"expected a type name, got {name!r}")
        if self.accept("."):
            kind2, name2 = self.take()
            if name != "FHIR" or kind2 != "id":
                raise FHIRPathUnsupported(f"type {name}.{name2}")
            name = name2
        return name.strip("`")

    def additive(self) -> Any:
        node = self.invocation()
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] in ("+", "-", "&", "*", "/"):
            raise FHIRPathUnsupported(f"operator {tok[1]!r}")
        return node

    def invocation(self) -> Any:
        node = self.term()
        while True:
            if self.accept("."):
                kind, name = self.take()
                if kind != "id":
                    raise FHIRPathUnsupported(f"expected a name after '.', got {name!r}")
                node = self.member_or_call(node, name.strip("`"))
            elif self.accept("["):
                kind, num = self.take()
                if kind != "num" or "." in num:
                    raise FHIRPathUnsupported("only integer indexes are supported")
                self.expect("]")
                node = _Index(node, int(num))
            else:
                return node

    def member_or_call(self, target: Any, name: str) -> Any:
        if self.accept("("):
            args: list[Any] = []
            if not self.accept(")"):
                args.append(self.expr())
                while self.accept(","):
                    args.append(self.expr())
                self.expect(")")
            return _Call(target, name, tuple(args))
        return _Member(target, name) if target is not None else _Ident(name)

    def term(self) -> Any:
        kind, value = self.take()
        if kind == "str":
            return _Literal(_unquote(value), "string")
        if kind == "num":
            return _Literal(float(value), "decimal") if "." in value else _Literal(int(value), "integer")
        if kind == "op" and value == "(":
            node = self.expr()
            self.expect(")")
            return node
        if kind == "op" and value == "-":
            raise FHIRPathUnsupported("unary minus")
        if kind == "id":
            if value in ("true", "false"):
                return _Literal(value == "true", "boolean")
            if value.startswith("%"):
                raise FHIRPathUnsupported(f"environment variable {value}")
            if value == "$this":
                return _Ident("$this")
            return self.member_or_call(None, value.strip("`"))
        raise FHIRPathUnsupported(f"unexpected {value!r}")


# ---- compiler -----------------------------------------------------------------------------------


def _identity(items: Values) -> Values:
    return items


def _constant(value: Any) -> BranchFn:
    result = [value]

    def fn(items: Values) -> Values:
        return list(result)

    return fn


def _step(prev: BranchFn, key: str, primitive: bool) -> BranchFn:
    """`prev.key`: arrays are flattened (FHIRPath collections have no nesting); a primitive array
    may hold nulls where only an extension is present (R4 json.html#primitive), which are skipped."""
    if prev is _identity:

        def first(items: Values) -> Values:
            out: Values = []
            for it in items:
                v = it.get(key)
                if v is None:
                    continue
                if v.__class__ is list:
                    out.extend(v)
                else:
                    out.append(v)
            return [x for x in out if x is not None] if primitive else out

        return first

    def step(items: Values) -> Values:
        out: Values = []
        for it in prev(items):
            v = it.get(key)
            if v is None:
                continue
            if v.__class__ is list:
                out.extend(v)
            else:
                out.append(v)
        return [x for x in out if x is not None] if primitive else out

    return step


def _memo(fn: BranchFn) -> BranchFn:
    """`fn`, remembering its last result: the branches a choice element forks into all start from
    the same input list (the `[resource]` an Extractor or Indexer passes to every branch), so
    the shared prefix runs once. The cache is one (input, result) tuple, read and replaced
    atomically; it holds its input alive, so `is` can't be fooled by a recycled id."""
    last: list[tuple[Values | None, Values]] = [(None, [])]

    def memo(items: Values) -> Values:
        seen, result = last[0]
        if seen is items:
            return result
        result = fn(items)
        last[0] = (items, result)
        return result

    return memo


def _key_equals(key: str, literal: Any, negate: bool) -> Callable[[Any], bool]:
    def test(it: Any) -> bool:
        v = it.get(key)
        if v is None:
            return False  # `{} = x` is empty, and so is `{} != x`: not true
        if v.__class__ is list:
            if not v:
                return False
            same = len(v) == 1 and _equal(v[0], literal)
        else:
            same = _equal(v, literal)
        return same is not negate

    return test


def _resolves_to(type_name: str) -> Callable[[Any], bool]:
    resolve = _resolve_types(_identity, True)
    any_type = type_name in _RESOURCE_BASES

    def test(it: Any) -> bool:
        types = resolve([it])
        return len(types) == 1 and (any_type or types[0] == type_name)

    return test


def _as_bool(values: Values) -> bool | None:
    """FHIRPath singleton evaluation of collections (§4.5): empty -> empty, a single boolean ->
    itself, any other single item -> true; more than one item is an error, treated as empty."""
    if len(values) != 1:
        return None
    v = values[0]
    return v if v.__class__ is bool else True


def _equal(a: Any, b: Any) -> bool:
    # FHIRPath equality (§6.1.1): values of different kinds are not equal; booleans never equal
    # numbers (Python's True == 1 would say otherwise).
    if (a.__class__ is bool) != (b.__class__ is bool):
        return False
    return bool(a == b)


class _Compiler:
    def __init__(self, resource_type: str) -> None:
        self.tm = _type_map()
        self.resource_type = resource_type
        self.resource_names = resource_types() | _RESOURCE_BASES

    def compile(self, node: Any, ctx: str, root: bool) -> list[Branch]:
        if isinstance(node, _Ident):
            if node.name == "$this":
                return [Branch(_identity, ctx)]
            if root and node.name in self.resource_names:
                # A type name at the start of a path filters the context by type (§4.1): the
                # branches of a shared expression rooted at other resource types are dropped.
                if node.name == ctx or node.name in _RESOURCE_BASES:
                    return [Branch(_identity, ctx)]
                return []
            return self.member([Branch(_identity, ctx)], node.name)
        if isinstance(node, _Member):
            return self.member(self.compile(node.target, ctx, root), node.name)
        if isinstance(node, _Literal):
            return [Branch(_constant(node.value), node.type)]
        if isinstance(node, _TypeOp):
            target = self.compile(node.target, ctx, root)
            return (
                self.type_is(target, node.type_name)
                if node.op == "is"
                else self.type_as(target, node.type_name)
            )
        if isinstance(node, _Call):
            target = (
                self.compile(node.target, ctx, root) if node.target is not None else [Branch(_identity, ctx)]
            )
            return self.call(target, node.name, node.args, ctx, root)
        if isinstance(node, _Index):
            return self.index(self.compile(node.target, ctx, root), node.index)
        if isinstance(node, _Binary):
            left = self.compile(node.left, ctx, root)
            right = self.compile(node.right, ctx, root)
            if node.op == "|":
                return left + right
            if node.op in ("=", "!="):
                return [Branch(self.equality(left, right, node.op == "!="), "boolean")]
            if node.op in ("and", "or"):
                return [Branch(self.logic(left, right, node.op), "boolean")]
            raise FHIRPathUnsupported(f"operator {node.op!r}")
        raise FHIRPathUnsupported(f"cannot compile {node!r}")

    # -- navigation

    def member(self, branches: list[Branch], name: str) -> list[Branch]:
        out: list[Branch] = []
        for b in branches:
            if b.type == _RESOLVED or b.type == "Resource":
                # a resolved or contained resource has a type known only at run time
                raise FHIRPathUnsupported(f"navigation into {b.type} ({name})")
            out.extend(self.children(b, name))
        if branches and not out:
            types = sorted({b.type for b in branches})
            raise FHIRPathUnsupported(f"{'/'.join(types)} has no element {name!r}")
        return out

    def children(self, b: Branch, name: str) -> list[Branch]:
        """The branches of `b.name`: none when the element does not exist on b's type (FHIRPath
        yields empty, §3: e.g. `.code` on the `valueString` branch of `Extension.value`)."""
        elements = self.tm.elements.get(b.type)
        if elements is None:
            return []  # a primitive: its `id` and `extension` are never indexed
        t = elements.get(name)
        key = None if b.fn is not _identity else name
        if t is not None:
            assert isinstance(t, str)
            system = self.tm.systems.get(f"{b.type}.{name}") if t == "code" else None
            return [Branch(_step(b.fn, name, self.is_primitive(t)), t, key, system)]
        choices = elements.get(name + "[x]")
        if choices is not None:
            # every choice type reads the same input: evaluate it once per call, not per type
            prev = b.fn if b.fn is _identity else _memo(b.fn)
            return [
                Branch(_step(prev, name + c[0].upper() + c[1:], self.is_primitive(c)), c) for c in choices
            ]
        # a choice element named with its type, as `Extension.valueDateTime` (accepted by the
        # FHIRPath engines R4 search expressions were written for)
        for i in range(1, len(name)):
            if name[i].isupper():
                choices = elements.get(name[:i] + "[x]")
                if choices is not None:
                    for c in choices:
                        if name[i:] == c[0].upper() + c[1:]:
                            return [Branch(_step(b.fn, name, self.is_primitive(c)), c)]
                break
        return []

    def is_primitive(self, type_name: str) -> bool:
        return type_name not in self.tm.elements

    def index(self, branches: list[Branch], n: int) -> list[Branch]:
        if len(branches) > 1:
            raise FHIRPathUnsupported("indexing a collection of several types")
        if not branches:
            return []
        fn = branches[0].fn

        def at(items: Values) -> Values:
            values = fn(items)
            return [values[n]] if n < len(values) else []

        return [Branch(at, branches[0].type, system=branches[0].system)]

    # -- types (§6.3): decided per branch at compile time, each branch having one FHIR type

    def matches(self, type_name: str, wanted: str) -> bool:
        """Whether a value of `type_name` is a `wanted`. Exact, except that every resource is a
        Resource and DomainResource: R4 search expressions always name the exact choice type, and
        some rely on it (`ConceptMap.source as uri` is `source-uri`, distinct from the canonical
        `source`, although canonical derives from uri)."""
        if wanted in _RESOURCE_BASES:
            return self.tm.is_a(type_name, wanted)
        return type_name == wanted

    def type_as(self, branches: list[Branch], type_name: str) -> list[Branch]:
        self.check_type(type_name)
        return [b for b in branches if self.matches(b.type, type_name)]

    def type_is(self, branches: list[Branch], type_name: str) -> list[Branch]:
        self.check_type(type_name)
        if any(b.type == _RESOLVED for b in branches):
            if len(branches) != 1:
                raise FHIRPathUnsupported("'is' on resolve() mixed with other values")
            resolved = branches[0].fn
            wanted = type_name

            def is_resolved(items: Values) -> Values:
                values = resolved(items)
                if len(values) != 1:
                    return []
                return [values[0] == wanted or wanted in _RESOURCE_BASES]

            return [Branch(is_resolved, "boolean")]
        matches = [self.matches(b.type, type_name) for b in branches]

        def is_type(items: Values) -> Values:
            found: list[bool] = []
            for b, match in zip(branches, matches, strict=True):
                found.extend(match for _ in b.fn(items))
            return found if len(found) == 1 else []

        return [Branch(is_type, "boolean")]

    def check_type(self, type_name: str) -> None:
        if type_name not in self.tm.base and type_name not in self.tm.elements:
            raise FHIRPathUnsupported(f"unknown type {type_name!r}")

    # -- functions (§5)

    def call(
        self, target: list[Branch], name: str, args: tuple[Any, ...], ctx: str, root: bool
    ) -> list[Branch]:
        if name in ("as", "ofType", "is"):
            if len(args) != 1 or not isinstance(args[0], _Ident | _Member):
                raise FHIRPathUnsupported(f"{name}() takes a type name")
            type_name = args[0].name
            if isinstance(args[0], _Member) and args[0].target != _Ident("FHIR"):
                raise FHIRPathUnsupported(f"{name}() of a qualified type")
            if name == "is":
                return self.type_is(target, type_name)
            # `as()` on a collection is applied item by item here, as ofType() is: R4 search
            # expressions such as `(Observation.component.value as Quantity)` rely on it.
            return self.type_as(target, type_name)
        if name == "where":
            if len(args) != 1:
                raise FHIRPathUnsupported("where() takes one argument")
            return [self.where(b, args[0]) for b in target]
        if name in ("exists", "empty"):
            if args:
                if name == "empty" or len(args) != 1:
                    raise FHIRPathUnsupported(f"{name}() with arguments")
                target = [self.where(b, args[0]) for b in target]
            fns = [b.fn for b in target]
            want = name == "exists"

            def exists(items: Values) -> Values:
                return [any(fn(items) for fn in fns) is want]

            return [Branch(exists, "boolean")]
        if name == "first" and not args:
            return self.index(target, 0)
        if name == "resolve" and not args:
            out = []
            for b in target:
                if b.type not in ("Reference", "canonical", "uri", "url"):
                    raise FHIRPathUnsupported(f"resolve() on {b.type}")
                out.append(Branch(_resolve_types(b.fn, b.type == "Reference"), _RESOLVED))
            return out
        raise FHIRPathUnsupported(f"function {name}()")

    def where(self, branch: Branch, criteria: Any) -> Branch:
        test = self.predicate(criteria, branch.type)
        fn = branch.fn

        def where(items: Values) -> Values:
            return [it for it in fn(items) if test(it)]

        return Branch(where, branch.type, system=branch.system)

    def predicate(self, criteria: Any, type_name: str) -> Callable[[Any], bool]:
        """`criteria` as a test of one item: true when it evaluates to `true` (§5.2 where()).
        The two shapes R4 search parameters use, `key = 'literal'` and `resolve() is Type`, get
        direct tests; anything else evaluates the compiled criteria on the item."""
        if (
            isinstance(criteria, _Binary)
            and criteria.op in ("=", "!=")
            and isinstance(criteria.right, _Literal)
        ):
            left = self.compile(criteria.left, type_name, root=False)
            if len(left) == 1 and left[0].key is not None:
                return _key_equals(left[0].key, criteria.right.value, criteria.op == "!=")
        if (
            isinstance(criteria, _TypeOp)
            and criteria.op == "is"
            and criteria.target == _Call(None, "resolve", ())
            and type_name == "Reference"
        ):
            self.check_type(criteria.type_name)
            return _resolves_to(criteria.type_name)
        crit = self.compile(criteria, type_name, root=False)
        crit_fns = [b.fn for b in crit]
        if not crit_fns:
            raise FHIRPathUnsupported("where() criteria that select nothing")

        def test(it: Any) -> bool:
            single = [it]
            return [v for f in crit_fns for v in f(single)] == [True]

        return test

    # -- operators

    def equality(self, left: list[Branch], right: list[Branch], negate: bool) -> BranchFn:
        lfns = [b.fn for b in left]
        rfns = [b.fn for b in right]

        def eq(items: Values) -> Values:
            # §6.1.1: empty if either side is empty; collections are equal when of the same size
            # and equal item by item, in order.
            lv = [v for f in lfns for v in f(items)]
            if not lv:
                return []
            rv = [v for f in rfns for v in f(items)]
            if not rv:
                return []
            same = len(lv) == len(rv) and all(_equal(a, b) for a, b in zip(lv, rv, strict=True))
            return [same is not negate]

        return eq

    def logic(self, left: list[Branch], right: list[Branch], op: str) -> BranchFn:
        lfns = [b.fn for b in left]
        rfns = [b.fn for b in right]

        def logic(items: Values) -> Values:
            # three-valued logic (§6.5)
            a = _as_bool([v for f in lfns for v in f(items)])
            b = _as_bool([v for f in rfns for v in f(items)])
            if op == "and":
                if a is False or b is False:
                    return [False]
                return [True] if a and b else []
            if a is True or b is True:
                return [True]
            return [False] if a is False and b is False else []

        return logic


def reference_type(reference: str) -> str | None:
    """The resource type a literal reference points at (R4 references.html#literal): `Type/id`,
    `Type/id/_history/v`, or an absolute URL ending so. None for `#contained`, `urn:` and
    anything else."""
    if not reference or reference[0] == "#" or reference.startswith("urn:"):
        return None
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] and parts[-1] and parts[-2][0].isupper():
        return parts[-2]
    return None


def _resolve_types(fn: BranchFn, is_reference: bool) -> BranchFn:
    """`resolve()` as far as the index can: the type of each target, from the reference's text or,
    for a logical reference, its `type` element (R4 Reference.type); never fetches anything."""

    def resolve(items: Values) -> Values:
        out: Values = []
        for it in fn(items):
            if is_reference:
                ref = it.get("reference")
                t = reference_type(ref) if isinstance(ref, str) else None
                if t is None and ref is None:
                    declared = it.get("type")
                    if isinstance(declared, str) and declared:
                        t = declared.rsplit("/", 1)[-1]
            else:
                t = reference_type(it) if isinstance(it, str) else None
            if t is not None:
                out.append(t)
        return out

    return resolve


def compile_strict(expression: str, resource_type: str) -> Extractor:
    """Compile or raise FHIRPathUnsupported saying why not."""
    if resource_type not in _type_map().elements:
        raise FHIRPathUnsupported(f"unknown resource type {resource_type!r}")
    tree = _Parser(expression).parse()
    branches = _Compiler(resource_type).compile(tree, resource_type, root=True)
    if not branches:
        raise FHIRPathUnsupported(f"selects nothing on {resource_type}")
    return Extractor(expression, resource_type, tuple(branches))


@functools.cache
def compile_expression(expression: str, resource_type: str) -> Extractor | None:
    """The expression compiled for `resource_type` (cached), or None if it uses FHIRPath this
    module does not implement."""
    try:
        return compile_strict(expression, resource_type)
    except FHIRPathUnsupported:
        return None
