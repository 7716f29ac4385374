"""What attention heads and MLP neurons share as sets of (layer, index) pairs: their spellings, their
canonical form and text, and their validation against a model's shape.

Researchers write a component as `L3 H13` / `L20 N1234` (or without the space), as YAML pairs
(`[3, 13]`), and heads also as notebooks print them (`3.13`). Everything is normalised to a sorted
tuple of `(layer, index)` pairs, so one set has one identity whatever its spelling. `verif.design.heads`
and `verif.design.neurons` each describe their kind with a `Kind` and draw their own random sets.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Pair = tuple[int, int]

# Items are split on commas, semicolons and newlines; inside one, `L3 H13 L4 H5` splits between pairs.
_ITEM_SPLIT = re.compile(r"[,;\n]+")


@dataclass(frozen=True)
class Kind:
    """One kind of component: its name, the letter of its index and how one is written."""

    noun: str  # "head"
    letter: str  # "H": `L3 H13`
    per_layer: str  # "heads per layer", in the out-of-range message
    token: re.Pattern  # one component as text; its non-empty groups are layer, index
    spellings: str  # the accepted spellings, for the parse error
    example: str  # one spelling, for the parse error of a list item

    @property
    def _spaced_pair(self) -> re.Pattern:
        return re.compile(rf"[Ll]\d+\s+[{self.letter}{self.letter.lower()}]\d+")

    def _parse_token(self, token: str) -> Pair:
        m = self.token.match(token.strip())
        if not m:
            raise ValueError(f"cannot parse {self.noun} {token!r}: write {self.noun}s as {self.spellings}")
        layer, index = (int(g) for g in m.groups() if g is not None)
        return layer, index

    def _text_tokens(self, text: str) -> list[str]:
        tokens: list[str] = []
        for item in _ITEM_SPLIT.split(text):
            pairs = self._spaced_pair.findall(item)  # `L3 H13 L4 H5`: pairs separated by spaces
            tokens.extend(pairs + self._spaced_pair.sub(" ", item).split())
        return tokens

    def parse(self, spec: str | Iterable) -> list[Pair]:
        """A set in any accepted spelling, in the order given (duplicates kept: `validate` names them)."""
        if isinstance(spec, str):
            return [self._parse_token(t) for t in self._text_tokens(spec)]
        pairs: list[Pair] = []
        for item in spec:
            if isinstance(item, str):
                pairs.extend(self.parse(item))
            elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(v, int) for v in item):
                pairs.append((int(item[0]), int(item[1])))
            else:
                raise ValueError(f"cannot parse {self.noun} {item!r}: expected [layer, {self.noun}] or a string "
                                 f"like {self.example}")
        return pairs

    def format(self, pairs: Iterable[Pair]) -> str:
        """Canonical text form, e.g. 'L3 H13, L4 H0'."""
        return ", ".join(f"L{layer} {self.letter}{i}" for layer, i in canonical(pairs))

    def validate(self, pairs: Sequence[Pair], n_layers: int, per_layer: int, what: str) -> tuple[Pair, ...]:
        """Check every pair against the model's shape and refuse duplicates; returns the canonical set."""
        errors = []
        for layer, i in pairs:
            if not 0 <= layer < n_layers:
                errors.append(f"L{layer} {self.letter}{i}: model has {n_layers} layers (0-{n_layers - 1})")
            elif not 0 <= i < per_layer:
                errors.append(f"L{layer} {self.letter}{i}: model has {per_layer} {self.per_layer} (0-{per_layer - 1})")
        dupes = [p for p, c in Counter(pairs).items() if c > 1]
        if dupes:
            errors.append(f"duplicate {self.noun}s: {self.format(dupes)}")
        if errors:
            raise ValueError(f"{what}: " + "; ".join(errors))
        return canonical(pairs)


def canonical(pairs: Iterable[Pair]) -> tuple[Pair, ...]:
    """Sorted, duplicate-free form: the identity of a set."""
    return tuple(sorted({(int(layer), int(i)) for layer, i in pairs}))


def count_sets(size: int, n_layers: int, per_layer: int, exclude: Iterable[Pair] = (),
               match_layers_of: Sequence[Pair] | None = None) -> int:
    """How many distinct sets random control draws can give, exactly: `size` of the components not
    excluded, or, with `match_layers_of`, that set's count of components in each of its layers.

    Random draws reject a set they already have, so asking for more sets than exist would draw
    forever; the draws check this count first (a Python int: C(576, 29) is about 10^48).
    """
    excluded = {(int(layer), int(i)) for layer, i in exclude if 0 <= layer < n_layers and 0 <= i < per_layer}
    if match_layers_of is None:
        return math.comb(n_layers * per_layer - len(excluded), size)
    taken = Counter(layer for layer, _ in excluded)
    needed = Counter(layer for layer, _ in match_layers_of)
    return math.prod(math.comb(per_layer - taken[layer], k) if 0 <= layer < n_layers else 0
                     for layer, k in needed.items())


def check_enough_sets(n_sets: int, count: int, size: int, noun: str) -> None:
    """Refuse a request for more distinct control sets than `count_sets` says exist."""
    if n_sets > count:
        raise ValueError(f"only {count} distinct control sets of {size} {noun}s exist under these constraints")
