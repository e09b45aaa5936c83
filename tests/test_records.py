"""records.record behaves as dataclasses.dataclass with the same declaration (criu_xstate/records.py).

Every class is declared twice from one specification, once with each decorator, and both are driven
with the same calls: construction (positional, by name, missing, extra or repeated arguments),
defaults and default factories, repr, equality, hashing, frozenness, replace, as_dict, match
arguments, __post_init__, slots and cached_property.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import string
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from criu_xstate import records
from criu_xstate.records import FrozenInstanceError, record

# one specification: (name, kind) with kind "plain" (no default), "default", "factory" or "hidden"
Spec = list[tuple[str, str]]
KINDS = ["plain", "default", "factory", "hidden"]


def _declare(spec: Spec, frozen: bool, slots: bool, use_records: bool) -> type:
    field = records.field if use_records else dataclasses.field
    namespace: dict[str, Any] = {"__annotations__": {}, "__doc__": "a record"}
    for name, kind in spec:
        namespace["__annotations__"][name] = "object"
        if kind == "default":
            namespace[name] = (name, 1)
        elif kind == "factory":
            namespace[name] = field(default_factory=lambda: [0])
        elif kind == "hidden":
            namespace[name] = field(default=None, repr=False)
    cls = type("R", (), namespace)
    if use_records:
        return record(frozen=frozen, slots=slots)(cls)
    return dataclasses.dataclass(frozen=frozen, slots=slots)(cls)


def _outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", call()
    except (TypeError, AttributeError) as exc:
        # the kind of error, not its wording (argument errors name the function differently)
        kind = (
            "frozen" if isinstance(exc, (FrozenInstanceError, dataclasses.FrozenInstanceError)) else type(exc)
        )
        return "error", kind


def _specs() -> st.SearchStrategy[Spec]:
    names = st.lists(st.sampled_from(string.ascii_lowercase[:8]), unique=True, max_size=6)
    return names.flatmap(
        lambda ns: (
            st.lists(
                st.sampled_from(["plain", "default", "factory", "hidden"]), min_size=len(ns), max_size=len(ns)
            )
            .map(lambda kinds: sorted(kinds, key=lambda k: k != "plain"))  # no default before a non-default
            .map(lambda kinds: list(zip(ns, kinds, strict=True)))
        )
    )


@settings(max_examples=300, deadline=None)
@given(spec=_specs(), frozen=st.booleans(), slots=st.booleans(), data=st.data())
def test_a_record_behaves_as_the_dataclass_with_the_same_declaration(
    spec: Spec, frozen: bool, slots: bool, data: st.DataObject
) -> None:
    ours = _declare(spec, frozen, slots, use_records=True)
    theirs = _declare(spec, frozen, slots, use_records=False)
    values = st.one_of(st.integers(), st.text(max_size=3), st.none(), st.tuples(st.integers()))
    positional = data.draw(st.lists(values, max_size=len(spec) + 1))
    names = [n for n, _ in spec] + ["zz"]
    by_name = data.draw(st.dictionaries(st.sampled_from(names), values, max_size=3))
    a_kind, a = _outcome(lambda: ours(*positional, **by_name))
    b_kind, b = _outcome(lambda: theirs(*positional, **by_name))
    assert a_kind == b_kind, (spec, positional, by_name, a, b)
    if a_kind == "error":
        assert a == b
        return
    assert repr(a) == repr(b)
    assert [getattr(a, n) for n, _ in spec] == [getattr(b, n) for n, _ in spec]
    twin = ours(*positional, **by_name)
    assert (a == twin) is (b == theirs(*positional, **by_name)) is True
    assert a != b  # different classes are never equal, as two dataclasses
    assert (a.__hash__ is None) is (b.__hash__ is None)
    if frozen:
        assert _outcome(lambda: hash(a))[0] == _outcome(lambda: hash(b))[0]
        if _outcome(lambda: hash(a))[0] == "ok":
            assert hash(a) == hash(twin) == hash(b)  # the hash of the field tuple, as a dataclass's
    assert ours.__match_args__ == theirs.__match_args__  # type: ignore[attr-defined]
    assert hasattr(a, "__dict__") is hasattr(b, "__dict__")
    if spec:
        change = {spec[0][0]: "changed"}
        assert repr(records.replace(a, **change)) == repr(dataclasses.replace(b, **change))
    assert _outcome(lambda: records.replace(a, zz=1))[0] == _outcome(lambda: dataclasses.replace(b, zz=1))[0]
    assert records.as_dict(a) == dataclasses.asdict(b)
    assert _outcome(lambda: copy.copy(a) == a) == _outcome(lambda: copy.copy(b) == b)
    assert [f.name for f in records.fields(a)] == [f.name for f in dataclasses.fields(b)]
    for attr in [*names[:1], "new_attribute"]:  # last: a mutable record may lose a field here
        for act in (setattr, delattr):
            args = (attr, 5) if act is setattr else (attr,)
            expected = _outcome(functools.partial(act, theirs(*positional, **by_name), *args))
            if frozen and slots and attr not in dict(spec):  # CPython 3.11's frozen slots dataclass calls
                expected = ("error", "frozen")  # super() with the class it replaced: a TypeError
            assert _outcome(functools.partial(act, ours(*positional, **by_name), *args)) == expected


def test_a_factory_gives_each_instance_its_own_value() -> None:
    @record
    class R:
        """r"""

        items: list[int] = records.field(default_factory=list)

    one, two = R(), R()
    one.items.append(1)
    assert two.items == [] and R([5]).items == [5]


def test_mutable_defaults_and_a_default_before_a_field_without_one_are_refused_as_by_dataclasses() -> None:
    for decorate in (record, dataclasses.dataclass(frozen=True)):
        with pytest.raises(ValueError, match="mutable default"):
            decorate(type("R", (), {"__annotations__": {"a": "list[int]"}, "a": [], "__doc__": "r"}))
        with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
            decorate(type("R", (), {"__annotations__": {"a": "int", "b": "int"}, "a": 1, "__doc__": "r"}))
    with pytest.raises(ValueError, match="both default and default_factory"):
        records.field(default=1, default_factory=list)


def test_a_record_may_not_define_what_it_generates() -> None:
    with pytest.raises(TypeError, match="defines __eq__"):

        @record
        class R:
            """r"""

            a: int

            def __eq__(self, other: object) -> bool:
                return True


@pytest.mark.parametrize("name", ["self", "_setattr", "_MISSING", "_factory_0"])
def test_a_field_may_not_take_a_name_the_generated_init_uses(name: str) -> None:
    """The template __init__ (one per shape) names its instance, object.__setattr__, the missing marker
    and the factories: a field of one of those names is refused, not silently miscompiled."""
    with pytest.raises(TypeError, match=f"cannot be named {name!r}"):
        record(type("R", (), {"__annotations__": {name: "int"}, "__doc__": "r"}))


def test_post_init_class_variables_generic_bases_and_cached_properties() -> None:
    seen = []
    T = TypeVar("T")

    @record
    class R(Generic[T]):
        """r"""

        a: T
        b: int = 2
        LIMIT: ClassVar[int] = 9

        def __post_init__(self) -> None:
            seen.append(self.a)

        @functools.cached_property
        def twice(self) -> int:
            seen.append("computed")
            return self.b * 2

    r = R[str]("x")
    assert seen == ["x"] and [f.name for f in records.fields(R)] == ["a", "b"] and R.LIMIT == 9
    assert r.twice == 4 and r.twice == 4 and seen == ["x", "computed"]  # cached on a frozen record
    assert r == R("x") and r != R("y") and hash(r) == hash(R("x"))
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'a'"):
        r.a = "y"  # type: ignore[misc]
    match r:
        case R(a, b):
            assert (a, b) == ("x", 2)
    assert records.as_dict(R(R(1), 3)) == {"a": {"a": 1, "b": 2}, "b": 3}
    with pytest.raises(TypeError, match="is not a record"):
        records.fields(object())


def test_every_record_of_the_package_is_built_by_records() -> None:
    """No module falls back to dataclasses (the hook path must not import it: test_perf_invariants)."""
    import importlib
    import pkgutil

    import criu_xstate

    for info in pkgutil.walk_packages(criu_xstate.__path__, "criu_xstate."):
        if info.name.startswith("criu_xstate.images.pb.") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == info.name:
                assert not dataclasses.is_dataclass(value), f"{info.name}.{value.__name__} is a dataclass"


def test_class_variables_are_not_fields_whether_annotations_are_strings_or_objects() -> None:
    for annotation in ("ClassVar[int]", ClassVar[int], ClassVar):
        cls = record(
            type("R", (), {"__annotations__": {"a": "int", "LIMIT": annotation}, "LIMIT": 3, "__doc__": "r"})
        )
        assert [f.name for f in records.fields(cls)] == ["a"] and cls(1).LIMIT == 3
