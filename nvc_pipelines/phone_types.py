"""The type of a +44 number, remembered by the leading digits that decide it.

`phonenumbers` finds a number's type by matching it against a dozen patterns of GB's metadata (and
of Guernsey's, the Isle of Man's and Jersey's when GB's give none): about 5 µs a number, the largest
part of normalising a patient's phones. Those patterns only constrain a number's first few digits
and its length: `7(?:[1-3]\\d\\d|4(?:[0-46-9]\\d|...))\\d{6}` says nothing of the last six digits
of a mobile. So once the first k digits of a number of length n leave no pattern anything more to
look at, every number of length n with those k digits has the same type, and the type is kept under
those digits.

Exact by construction: each pattern is expanded (`re`'s own parser) into the finite set of digit-class
sequences it matches, and a prefix is "decided" only when every sequence that fits it, of every
pattern the library consults for +44 (the types of the four regions and their leading digits), is
unconstrained past it. A pattern with anything else in it (a look-ahead, an unbounded repeat) turns
the table off and every number goes to the library (`TypeTable.exact` is False).
"""

from __future__ import annotations

# The parser `re` itself uses (stdlib, versioned with Python; typeshed has no stubs for it).
import re._constants as sre_constants  # type: ignore[import-not-found]
import re._parser as sre_parser  # type: ignore[import-not-found]
from collections.abc import Callable, Iterable

from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

DIGITS = frozenset("0123456789")
# The descriptions `_number_type_helper` consults, in its order (general first).
DESCRIPTIONS = (
    "general_desc",
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
    "mobile",
)
# Prefixes remembered at most (distinct decided prefixes are a few thousand in any real practice).
MAX_PREFIXES = 100_000

Sequence = tuple[frozenset[str], ...]


class Unsupported(ValueError):
    """A pattern construct the expansion does not handle."""


def _charset(items: Iterable[tuple[object, object]]) -> frozenset[str]:
    chars: set[str] = set()
    for op, arg in items:
        if op is sre_constants.LITERAL and isinstance(arg, int):
            chars.add(chr(arg))
        elif op is sre_constants.RANGE and isinstance(arg, tuple):
            chars.update(chr(c) for c in range(arg[0], arg[1] + 1))
        elif op is sre_constants.CATEGORY and arg is sre_constants.CATEGORY_DIGIT:
            chars.update(DIGITS)
        else:
            raise Unsupported(f"{op} in a character class")
    return frozenset(chars) & DIGITS


def _expand(items: Iterable[tuple[object, object]]) -> list[Sequence]:
    """Every digit-class sequence the parsed pattern matches in full."""
    out: list[Sequence] = [()]
    for op, arg in items:
        out = [a + b for a in out for b in _node(op, arg)]
    return out


def _node(op: object, arg: object) -> list[Sequence]:
    if op is sre_constants.LITERAL and isinstance(arg, int):
        return [(frozenset(chr(arg)),)]
    if op is sre_constants.IN and isinstance(arg, list):
        return [(_charset(arg),)]
    if op is sre_constants.SUBPATTERN and isinstance(arg, tuple):
        return _expand(arg[-1])
    if op is sre_constants.BRANCH and isinstance(arg, tuple):
        return [seq for branch in arg[1] for seq in _expand(branch)]
    if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT) and isinstance(arg, tuple):
        low, high, sub = arg
        if high is sre_constants.MAXREPEAT:
            raise Unsupported("an unbounded repeat")
        inner = _expand(sub)
        out: list[Sequence] = []
        current: list[Sequence] = [()]
        for count in range(high + 1):
            if count >= low:
                out += current
            current = [a + b for a in current for b in inner]
        return out
    raise Unsupported(str(op))


def _depth(seq: Sequence) -> int:
    """How many leading digits the sequence looks at (past them, any digit fits)."""
    return max((i + 1 for i, chars in enumerate(seq) if chars != DIGITS), default=0)


class TypeTable:
    """`kind_of(national)` (the national significant number as digits) as `compute(national)` gives
    it, remembered under the shortest prefix that decides it."""

    def __init__(self, compute: Callable[[str], int], country_code: int = 44) -> None:
        self.compute = compute
        self.full: dict[int, list[tuple[Sequence, int]]] = {}  # length -> (sequence, depth)
        self.leading: list[tuple[Sequence, int]] = []  # leading-digit patterns: matched as prefixes
        self.exact = True
        try:
            for region in COUNTRY_CODE_TO_REGION_CODE.get(country_code, ()):
                metadata = PhoneMetadata.metadata_for_region(region)
                if metadata is None:
                    continue
                for name in DESCRIPTIONS:
                    desc = getattr(metadata, name, None)
                    pattern = desc.national_number_pattern if desc is not None else None
                    for seq in _expand(sre_parser.parse(pattern)) if pattern else ():
                        self.full.setdefault(len(seq), []).append((seq, _depth(seq)))
                if metadata.leading_digits:
                    self.leading += [(seq, _depth(seq)) for seq in _expand(sre_parser.parse(metadata.leading_digits))]
        except Unsupported:
            self.exact = False
        # A prefix is decided at most as deep as the deepest pattern looks (`_decided_at`).
        deepest = max([d for seqs in self.full.values() for _, d in seqs] + [d for _, d in self.leading], default=0)
        self.depths = range(deepest + 1)
        self.known: dict[tuple[int, str], int] = {}

    def _decided_at(self, national: str) -> int:
        """The fewest leading digits past which no pattern looks, for numbers of this length."""
        candidates = [*self.full.get(len(national), ()), *((s, d) for s, d in self.leading if len(s) <= len(national))]
        for k in range(len(national) + 1):
            if all(d <= k for seq, d in candidates if all(national[i] in seq[i] for i in range(min(k, len(seq))))):
                return k
        return len(national)

    def kind_of(self, national: str) -> int:
        n = len(national)
        known = self.known
        for k in self.depths:
            if k > n:
                break
            kind = known.get((n, national[:k]))
            if kind is not None:
                return kind
        kind = self.compute(national)
        # Only a national number as the patterns read it: ASCII digits, no zero in front (a number
        # with one is typed by the library as a number, without it; so no prefix of it decides).
        if (
            self.exact
            and national.isascii()
            and national.isdigit()
            and national[:1] != "0"
            and len(known) < MAX_PREFIXES
        ):
            known[(n, national[: self._decided_at(national)])] = kind
        return kind
