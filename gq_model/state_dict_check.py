"""One check of a state dict against the keys and shapes a model expects, for every loader of weights.

Bundles, reference checkpoints, ZeRO checkpoints and DINOv2 files all load strictly: a partial model gives wrong tokens
or features without failing. ``torch``'s own ``load_state_dict`` error stops at the first kind of problem and names
keys without shapes, so each loader used to write its own comparison; this is the one they share, naming every
missing key, unexpected key and shape mismatch (the first few of each) in one message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["KeyMismatch", "StateDictMismatch", "compare_keys", "check_keys"]


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


@dataclass(frozen=True)
class KeyMismatch:
    """What differs between two state dicts (sorted key names; shape lines read ``key: file (..) vs model (..)``)."""

    missing: list[str]
    unexpected: list[str]
    shapes: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, limit: int = 8) -> str:
        def some(items: list[str], sep: str) -> str:
            return sep.join(items[:limit]) + (" ..." if len(items) > limit else "")

        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} missing key(s): {some(self.missing, ', ')}")
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected key(s): {some(self.unexpected, ', ')}")
        if self.shapes:
            problems.append(f"{len(self.shapes)} shape mismatch(es): {some(self.shapes, '; ')}")
        return " | ".join(problems)


class StateDictMismatch(ValueError):
    """A state dict that does not fit its model; ``mismatch`` holds the keys (a ``ValueError`` for old callers)."""

    def __init__(self, message: str, mismatch: KeyMismatch):
        super().__init__(message)
        self.mismatch = mismatch


def compare_keys(expected: Mapping[str, Any], got: Mapping[str, Any], *, got_name: str = "file",
                 expected_name: str = "model") -> KeyMismatch:
    """Compare ``got`` (tensors) with ``expected`` (tensors or shapes)."""
    shapes = sorted(f"{k}: {got_name} {_shape(got[k])} vs {expected_name} {_shape(v)}" for k, v in expected.items()
                    if k in got and _shape(got[k]) != _shape(v))
    return KeyMismatch(missing=sorted(set(expected) - set(got)), unexpected=sorted(set(got) - set(expected)),
                       shapes=shapes)


def check_keys(expected: Mapping[str, Any], got: Mapping[str, Any], *, what: str, hint: str = "",
               got_name: str = "file", expected_name: str = "model", limit: int = 8) -> None:
    """Raise :class:`StateDictMismatch` (``"{what}: <problems>. {hint}"``) unless ``got`` has exactly the expected
    keys with the expected shapes."""
    mismatch = compare_keys(expected, got, got_name=got_name, expected_name=expected_name)
    if mismatch:
        raise StateDictMismatch(f"{what}: {mismatch.describe(limit)}" + (f". {hint}" if hint else ""), mismatch)
