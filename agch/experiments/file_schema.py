"""The shape of the YAML files agch reads (search spaces, ablations) as pydantic models, and their errors as one line:
'FILE line N: key.path: message', an unknown key with the closest known one and the list of them all.

A model checks keys, types (no bool or string where a number belongs) and bounds. What depends on the config
(parameter names and values, presets) and rules between fields stay with the code that reads the model.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from agch.errors import UserError, unknown

WANTED = {"int_type": "an integer", "float_type": "a number", "finite_number": "a finite number",
          "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping", "list_type": "a list"}
"""What a value had to be, by pydantic error type."""
BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class Where:
    """Names a place in a YAML file as 'FILE line N: key.path', lines taken from the parsed node tree (without the
    file's text, as 'SOURCE: key.path')."""

    def __init__(self, source: object, text: str | None = None):
        self.source, self.lines = source, {}

        def walk(node: Any, keys: tuple) -> None:
            items = []
            if isinstance(node, yaml.MappingNode):
                items = [(str(key.value), key, value) for key, value in node.value]
            elif isinstance(node, yaml.SequenceNode):
                items = [(i, item, item) for i, item in enumerate(node.value)]
            for key, marked, value in items:
                self.lines[(*keys, key)] = marked.start_mark.line + 1
                walk(value, (*keys, key))

        if text is not None:
            walk(yaml.compose(text), ())

    def __call__(self, *keys: str | int) -> str:
        """At the line of the deepest of `keys` the file has; just the source for no keys."""
        path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
        for cut in range(len(keys), 0, -1):
            if keys[:cut] in self.lines:
                return f"{self.source} line {self.lines[keys[:cut]]}: {path}"
        return f"{self.source}: {path}" if keys else str(self.source)


class Schema(BaseModel):
    """A mapping in a file: unknown keys, values of the wrong type and numbers that are not finite are refused; null
    means absent."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    noun: ClassVar[str] = "key"
    """What errors call an unknown key here ('unknown key in sampler ...')."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


M = TypeVar("M", bound=Schema)


def shorthand(kinds: type | tuple[type, ...], key: str | None = None) -> BeforeValidator:
    """A value of type `kinds` stands for {key: value} (`sampler: tpe`), or for [value] without a key
    (`fixes: alignment`)."""
    return BeforeValidator(lambda value: value if not isinstance(value, kinds) else {key: value} if key else [value])


def validate(model: type[M], data: Any, where: Where) -> M:
    """`data` as a `model`, or a UserError about the first thing wrong with it: an unknown key when there is one (a
    misspelt key is also a missing one), else the first error pydantic found."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise _user_error(model, error, where) from None


def _user_error(model: type[Schema], error: Any, where: Where) -> UserError:
    keys, owner, expected = _walk(model, error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return unknown(owner.noun, str(keys[-1]), owner.model_fields, where(*keys))
    if kind == "missing":
        return UserError(f"{where(*keys[:-1])}: missing '{keys[-1]}'")
    description = owner.model_fields[keys[-1]].description if owner is not None else None
    if description or kind == "model_type":
        wanted = description or f"a mapping of {', '.join(expected.model_fields)}"
    elif kind == "literal_error":
        wanted = error["ctx"]["expected"]
    else:
        bound = next((f"{BOUNDS[k]} {v:g}" for k, v in error.get("ctx", {}).items() if k in BOUNDS), None)
        wanted = bound or WANTED.get(kind)
    problem = f"must be {wanted}" if wanted else error["msg"]
    return UserError(f"{where(*keys)}: {problem}, got {error['input']!r}")


def _walk(model: type[Schema], loc: tuple) -> tuple[tuple, type[Schema] | None, Any]:
    """Pydantic's error location as keys in the file (without its tags naming a union's member), the model whose
    field or unknown key the last key is (None for a mapping's key or a list's index) and the type expected there."""
    node, owner, path = model, None, []
    for part in loc:
        node = _bare(node)
        if get_origin(node) in (Union, types.UnionType) or part == "[key]":
            node = None  # `part` names the member of a union, or says a mapping's key is wrong: not a key in the file
            continue
        owner = node if isinstance(node, type) and issubclass(node, BaseModel) else None
        if owner is not None:
            node = owner.model_fields[part].annotation if part in owner.model_fields else None
        else:
            node = get_args(node)[-1] if get_origin(node) in (dict, list) else None
        path.append(part)
    return tuple(path), owner, _bare(node)


def _bare(node: Any) -> Any:
    """X for X | None and for Annotated[X, ...]."""
    args = get_args(node)
    if get_origin(node) is Annotated:
        return _bare(args[0])
    if get_origin(node) in (Union, types.UnionType) and type(None) in args and len(args) == 2:
        return _bare(args[0] if args[1] is type(None) else args[1])
    return node
