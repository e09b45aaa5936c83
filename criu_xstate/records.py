"""Records: the package's value classes, as ``dataclasses.dataclass(frozen=True)`` makes them, with only
``__init__`` compiled per class.

Why not the standard decorator: on CPython 3.11 and 3.12 it compiles every generated method separately
(``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``, ``__delattr__``: six ``exec``
calls per frozen class, ~0.45 ms of its ~0.55 ms), and it imports :mod:`inspect` (with ``ast``, ``dis``
and ``tokenize``, ~8 ms). The hook imports ~70 such classes inside every ``criu restore``: ~35 ms, and
the whole hook has ~60 (docs/records.md has the numbers). Batching the six into one ``exec`` (as CPython
3.13 does) saves ~15%; compiling only ``__init__`` and sharing the rest saves ~85%.

What a record is, exactly as a dataclass with the same declaration (``tests/test_records.py`` holds the
two to the same behaviour): fields are the class's annotations in order, after its record bases'; a
class attribute is a field's default; :func:`field` gives a ``default_factory`` or ``repr=False``;
``__init__`` takes the fields positionally or by name and calls ``__post_init__`` when the class has
one; ``__eq__`` compares the fields of two instances of the same class; frozen records (the default)
refuse assignment and deletion with the message of :class:`dataclasses.FrozenInstanceError` and hash
their fields, mutable ones (``frozen=False``) are unhashable. ``slots=True`` gives ``__slots__``.
Instances cost what a dataclass's cost: the same ``__init__`` (``object.__setattr__`` per field of a
frozen record; storing through ``self.__dict__`` instead made a 4000-thread plan 4% slower, since it
turns the instance's inline attribute values into a real dict: 216 bytes an instance instead of 152).

Copies and pickles work as a dataclass's (a frozen slots record gets ``__getstate__``/``__setstate__``).
Not supported, because nothing here uses it: ``order``, ``kw_only``, ``InitVar``, ``init=False``,
``compare=False``, and a class's own ``__init__``/``__eq__``/``__hash__``/``__repr__``/``__setattr__``/
``__delattr__`` (refused). ``ClassVar`` annotations are not fields, whether strings (recognised by their
text, as dataclasses does) or objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import attrgetter
from types import CodeType, FunctionType
from typing import Any, ClassVar, TypeVar, dataclass_transform, get_origin, overload

T = TypeVar("T")
C = TypeVar("C", bound=type)

FIELDS = "__record_fields__"


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record (the same message as dataclasses')."""


class Field:
    """A field's declaration: its name, its default or default factory, and whether repr shows it."""

    __slots__ = ("default", "default_factory", "name", "repr")

    def __init__(self, default: object, default_factory: Callable[[], object] | None, repr: bool) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.repr = repr


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@overload
def field(*, default: T, repr: bool = True) -> T: ...
@overload
def field(*, default_factory: Callable[[], T], repr: bool = True) -> T: ...
@overload
def field(*, repr: bool = True) -> Any: ...
def field(
    *,
    default: object = MISSING,
    default_factory: Callable[[], object] | None = None,
    repr: bool = True,
) -> Any:
    """A field with a default factory (a new list per instance) or hidden from repr."""
    if default is not MISSING and default_factory is not None:
        raise ValueError("cannot specify both default and default_factory")
    return Field(default, default_factory, repr)


@overload
def record(cls: C, /) -> C: ...
@overload
def record(*, frozen: bool = True, slots: bool = False) -> Callable[[C], C]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: C | None = None, /, *, frozen: bool = True, slots: bool = False) -> C | Callable[[C], C]:
    """Make ``cls`` a record (see the module docstring); ``@record`` or ``@record(frozen=False)``."""

    def wrap(c: C) -> C:
        return _build(c, frozen, slots)

    return wrap if cls is None else wrap(cls)


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record class or instance, in order."""
    found: tuple[Field, ...] | None = getattr(obj, FIELDS, None)
    if found is None:
        raise TypeError(f"{obj!r} is not a record")
    return found


def replace(obj: T, /, **changes: object) -> T:
    """A copy of a record with some fields changed (``dataclasses.replace``)."""
    names = {f.name for f in fields(obj)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    kw = {name: changes[name] if name in changes else getattr(obj, name) for name in names}
    return type(obj)(**kw)


def as_dict(obj: object) -> dict[str, Any]:
    """A record's fields as a dict, records inside lists, tuples and dicts included
    (``dataclasses.asdict``)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}


def _plain(value: object) -> object:
    if hasattr(type(value), FIELDS):
        return as_dict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


# -- building ------------------------------------------------------------------------------------------


def _own_fields(cls: type) -> Iterator[Field]:
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063 (no inspect)
        if isinstance(annotation, str):  # this package's modules: `from __future__ import annotations`
            if annotation.startswith(("ClassVar", "typing.ClassVar")):
                continue
        elif annotation is ClassVar or get_origin(annotation) is ClassVar:
            continue
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(value, None, True)
        if isinstance(f.default, (list, dict, set)):
            raise ValueError(
                f"mutable default {type(f.default)} for field {name} is not allowed: use default_factory"
            )
        f.name = name
        yield f


def _build(cls: C, frozen: bool, slots: bool) -> C:
    inherited: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in base.__dict__.get(FIELDS, ()):
            inherited[f.name] = f
    for f in _own_fields(cls):
        inherited[f.name] = f
    all_fields = tuple(inherited.values())
    names = tuple(f.name for f in all_fields)
    seen_default = False
    for f in all_fields:
        if isinstance(cls.__dict__.get(f.name), Field):  # no Field object stays behind as a class attribute
            if f.default is MISSING:
                delattr(cls, f.name)
            else:
                setattr(cls, f.name, f.default)
        has = f.default is not MISSING or f.default_factory is not None
        if seen_default and not has:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
        seen_default = seen_default or has
    for name in _GENERATED:
        if name in cls.__dict__:  # a dataclass would keep the class's own; nothing here defines one
            raise TypeError(f"record {cls.__qualname__} defines {name}")
    if slots:
        cls = _with_slots(cls, names)
    methods = {"__init__": _init(all_fields, frozen, hasattr(cls, "__post_init__"))}
    methods.update(_compare(names, frozen))
    methods["__repr__"] = _repr(tuple(f.name for f in all_fields if f.repr))
    if frozen:
        methods.update(_frozen(cls, names))
        if slots:  # copy and pickle set slots with setattr, which refuses: as dataclasses, state by hand
            methods.update(_slot_state(names))
    for name, fn in methods.items():
        if fn is not None:
            fn.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, fn)
    setattr(cls, FIELDS, all_fields)
    setattr(cls, "__match_args__", names)  # noqa: B010  (mypy: a class attribute it cannot see)
    return cls


_GENERATED = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__")


def _init(all_fields: tuple[Field, ...], frozen: bool, post_init: bool) -> Any:
    """The one generated method: ``__init__`` with the fields as its parameters (compiled: a generic
    ``*args`` version costs every instance twice as much). Compiled once per shape (how many fields,
    which have a factory, frozen, ``__post_init__``), not per class: a shape's code object gets the
    class's field names with ``CodeType.replace`` and its defaults as the function's (67 classes of the
    hook's modules have 19 shapes; a compile is ~70 us, a replace ~2)."""
    factories = tuple(i for i, f in enumerate(all_fields) if f.default_factory is not None)
    shape = (len(all_fields), frozen, post_init, factories)
    template = _TEMPLATES.get(shape)
    if template is None:
        template = _TEMPLATES[shape] = _template(*shape)
    names = {_placeholder(i): f.name for i, f in enumerate(all_fields)}
    for name in names.values():  # the template's own names: a field of one would shadow it
        if name in ("self", "_setattr", "_MISSING") or name.startswith("_factory_"):
            raise TypeError(f"a record field cannot be named {name!r}")
    code = template.replace(
        co_varnames=tuple(names.get(n, n) for n in template.co_varnames),
        co_names=tuple(names.get(n, n) for n in template.co_names),
        co_consts=tuple(names.get(c, c) if isinstance(c, str) else c for c in template.co_consts),
    )
    g: dict[str, object] = {"_MISSING": MISSING, "_setattr": object.__setattr__}
    for i in factories:
        g[f"_factory_{i}"] = all_fields[i].default_factory
    defaults = tuple(
        MISSING if f.default_factory is not None else f.default
        for f in all_fields
        if f.default_factory is not None or f.default is not MISSING
    )
    return FunctionType(code, g, "__init__", defaults or None)


_TEMPLATES: dict[tuple[int, bool, bool, tuple[int, ...]], CodeType] = {}


def _placeholder(i: int) -> str:
    """The template's name for field ``i``: its parameter, its attribute or constant, replaced by the field's
    name in every use (a field named like another placeholder is harmless: names are replaced once)."""
    return f"_field_{i}_"


def _template(n: int, frozen: bool, post_init: bool, factories: tuple[int, ...]) -> CodeType:
    params, body = ["self"], []
    for i in range(n):
        name = _placeholder(i)
        params.append(name)
        value = f"_factory_{i}() if {name} is _MISSING else {name}" if i in factories else name
        if frozen:  # past the refusing __setattr__; not via self.__dict__, which would turn the
            body.append(f"_setattr(self, {name!r}, {value})")  # instance's inline values into a dict
        else:
            body.append(f"self.{name} = {value}")
    if post_init:
        body.append("self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n" + "".join(f" {line}\n" for line in body or ["pass"])
    g: dict[str, Any] = {}
    exec(source, g)
    code: CodeType = g["__init__"].__code__
    return code


def _values(names: tuple[str, ...]) -> Callable[[object], tuple[object, ...]]:
    if len(names) > 1:
        return attrgetter(*names)
    if names:  # attrgetter of one name gives the value itself, not a 1-tuple
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _compare(names: tuple[str, ...], frozen: bool) -> dict[str, Any]:
    values = _values(names)

    def __eq__(self: object, other: object) -> bool:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    def __hash__(self: object) -> int:
        return hash(values(self))

    return {"__eq__": __eq__, "__hash__": __hash__ if frozen else None}  # mutable: unhashable


def _repr(shown: tuple[str, ...]) -> Callable[[object], str]:
    def __repr__(self: object) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{self.__class__.__qualname__}({inner})"

    return __repr__


def _frozen(cls: type, names: tuple[str, ...]) -> dict[str, Any]:
    owner: Any = cls  # what super() starts after, for a subclass's own attributes (as a dataclass)

    def __setattr__(self: object, name: str, value: object) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(owner, self).__setattr__(name, value)

    def __delattr__(self: object, name: str) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(owner, self).__delattr__(name)

    return {"__setattr__": __setattr__, "__delattr__": __delattr__}


def _slot_state(names: tuple[str, ...]) -> dict[str, Any]:
    def __getstate__(self: object) -> list[object]:
        return [getattr(self, name) for name in names]

    def __setstate__(self: object, state: list[object]) -> None:
        for name, value in zip(names, state, strict=True):
            object.__setattr__(self, name, value)

    return {"__getstate__": __getstate__, "__setstate__": __setstate__}


def _with_slots(cls: C, names: tuple[str, ...]) -> C:
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__", *names)}
    namespace["__slots__"] = names
    new = type(cls)(cls.__name__, cls.__bases__, namespace)
    new.__qualname__ = cls.__qualname__
    return new
