"""Two small mixins that replace boilerplate once written in several classes: shared holders and dict round trips."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .errors import SAEInputError


class SharedOnCopy:
    """``copy.copy`` and ``copy.deepcopy`` return the object itself.

    ComfyUI deep-copies ``model_options`` on every ``ModelPatcher.clone()``; an object that lives there and
    holds SAE weights, a run's records or other per-run state must stay one object for every clone. Each
    class that uses this says in its docstring why it must be shared.
    """

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class DictRoundTrip:
    """``to_dict`` / ``from_dict`` for a dataclass.

    ``to_dict`` is ``dataclasses.asdict`` with top-level tuple fields as lists, which is the shape a JSON round
    trip gives back (so a dict read from a file compares equal to a fresh one). ``from_dict`` refuses anything
    but a mapping, unknown keys and missing required keys, naming them, with ``_unknown_key_error`` (the pack's
    SAEInputError unless the class sets its own type); missing keys with defaults take them and the class's own
    validation runs as usual.
    """

    _unknown_key_error = SAEInputError

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise cls._unknown_key_error(f"{cls.__name__}: expected an object (dict) of settings, found "
                                         f"{type(data).__name__}")
        fields = dataclasses.fields(cls)
        known = [f.name for f in fields]
        unknown = sorted(map(str, set(data) - set(known)))
        if unknown:
            raise cls._unknown_key_error(f"{cls.__name__}: unknown keys {unknown}; expected {known}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise cls._unknown_key_error(f"{cls.__name__}: missing keys {missing}; found keys {sorted(map(str, data))}")
        return cls(**dict(data))
