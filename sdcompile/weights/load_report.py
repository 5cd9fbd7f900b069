"""What loading reports: where the weights came from, and which keys it skipped or filled in."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sdcompile.weights.layout import StateDict

EXAMPLES_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class KeyGroup:
    """Keys that share a fate in loading (skipped or filled), with a few of them as examples."""

    reason: str
    count: int
    examples: tuple[str, ...]

    @classmethod
    def of(cls, reason: str, keys: Iterable[str]) -> KeyGroup:
        keys = sorted(keys)
        return cls(reason, len(keys), tuple(keys[:EXAMPLES_SHOWN]))

    def line(self, verb: str) -> str:
        more = ", …" if self.count > len(self.examples) else ""
        return f"{verb} {self.count} {self.reason}: {', '.join(self.examples)}{more}"


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """Where the weights came from and what loading skipped or filled in."""

    source: str
    file_dtypes: tuple[str, ...] = ()
    skipped: tuple[KeyGroup, ...] = ()
    filled: tuple[KeyGroup, ...] = ()

    def lines(self) -> list[str]:
        head = self.source + (f" (stored as {', '.join(self.file_dtypes)})" if self.file_dtypes else "")
        return ([head] + [group.line("skipped") for group in self.skipped]
                + [group.line("filled") for group in self.filled])


def float_dtypes(states: Iterable[StateDict]) -> tuple[str, ...]:
    """The floating-point dtypes the states hold, as sorted names (`float16`, …)."""
    dtypes = {str(v.dtype).removeprefix("torch.") for s in states for v in s.values() if v.is_floating_point()}
    return tuple(sorted(dtypes))
