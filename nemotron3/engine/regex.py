"""Regular expressions as automata for constrained decoding (structured outputs `regex` and `choice`).

A pattern compiles to a Thompson NFA. After any text, the set of NFA states it leads to tells whether the text can
still grow into a full match (the set is not empty) and whether it is one (the set holds the accepting state); this
prefix test is what masking tokens needs, and what Python's `re` cannot answer. Matching is `re.fullmatch`'s.

Supported: literals and escapes (\\n \\t \\r \\f \\v \\xhh \\uhhhh, escaped punctuation), `.` (any character but a
newline), classes `[...]` / `[^...]` with ranges, `\\d \\w \\s` and their negations (ASCII meanings, also inside
classes, negations outside them), groups `(...)` `(?:...)` `(?P<name>...)` `(?<name>...)`, alternation `|`,
quantifiers `* + ? {m} {m,} {m,n}` (a lazy `?` suffix is accepted: it matches the same strings), and `^` / `$` at
the pattern's ends. Backreferences, lookaround, word boundaries, inline flags and possessive quantifiers are refused
with a ValueError that names them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MAX_STATES = 50_000  # a {m,n} repeats its body's states; this bounds what one pattern may build
MAX_REPEAT = 1_000
_FAR = 1 << 30  # min_chars of a state set that cannot reach a match
# can_complete tracks match lengths until they repeat, for at most this many lengths and state visits (a pattern
# like [a-z]{3,900} takes ~900 lengths, 400 thousand visits, ~0.2 s once); past either, min_chars alone decides
MAX_LAYERS, MAX_VISITS = 4_096, 2_000_000

_DIGIT = ((ord("0"), ord("9")),)
_WORD = ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("_"), ord("_")), (ord("a"), ord("z")))
_SPACE = tuple((ord(c), ord(c)) for c in " \t\n\r\f\v")
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
_REFUSED_ESCAPES = {"b": "word boundaries (\\b)", "B": "word boundaries (\\B)", "A": "\\A", "Z": "\\Z", "z": "\\z",
                    "G": "\\G", "p": "Unicode properties (\\p)", "P": "Unicode properties (\\P)"}  # fmt: skip


@dataclass(frozen=True)
class CharSet:
    """Characters by code point ranges (inclusive), or every character outside them when negated."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def __contains__(self, c: str) -> bool:
        o = ord(c)
        inside = any(lo <= o <= hi for lo, hi in self.ranges)
        return inside != self.negated


def regex_escape(text: str) -> str:
    """A pattern matching exactly `text` (backslashes before the characters this parser reads as syntax)."""
    return "".join("\\" + c if c in _SYNTAX else c for c in text)


_SYNTAX = set("\\.^$*+?{}[]|()")


def _char(c: str) -> CharSet:
    return CharSet(((ord(c), ord(c)),))


@dataclass
class _NFA:
    eps: list[list[int]] = field(default_factory=list)  # state → states reached without reading
    edges: list[list[tuple[CharSet, int]]] = field(default_factory=list)  # state → (characters, next state)

    def new(self) -> int:
        if len(self.eps) >= MAX_STATES:
            raise ValueError(f"regex is too large (more than {MAX_STATES} automaton states): lower its repeat counts")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1


class _Parser:
    """Recursive descent: alternation := concat ('|' concat)*; concat := repeat*; repeat := atom quantifier*."""

    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r}: {what} (at position {self.i})")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() == "$":
            self.i += 1
        if self.i != len(self.p):
            raise self.fail("unbalanced ')'" if self.peek() == ")" else f"unexpected {self.peek()!r}")
        return node

    def alternation(self):
        options = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.concat())
        return options[0] if len(options) == 1 else ("alt", options)

    def concat(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$" and self.i == len(self.p) - 1:
                break
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self):
        node = self.atom()
        while self.peek() is not None and self.peek() in "*+?{":
            c = self.peek()
            if c == "{":
                bounds = self.bounds()
                if bounds is None:  # a literal "{" (as re reads "a{" or "a{x}")
                    break
                lo, hi = bounds
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() == "?":  # lazy: the same strings match
                self.i += 1
            elif self.peek() == "+":
                raise self.fail("possessive quantifiers are not supported")
            node = ("rep", node, lo, hi)
        return node

    def bounds(self) -> tuple[int, int | None] | None:
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        body = self.p[self.i + 1 : end]
        lo_s, comma, hi_s = body.partition(",")
        if not lo_s.isdigit() and not (comma and lo_s == ""):
            return None
        if hi_s and not hi_s.isdigit():
            return None
        lo = int(lo_s) if lo_s else 0
        hi = (int(hi_s) if hi_s else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.fail(f"repeat {{{body}}} has max < min")
        if max(lo, hi or 0) > MAX_REPEAT:
            raise self.fail(f"repeat counts above {MAX_REPEAT} are not supported")
        self.i = end + 1
        return lo, hi

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or (
                self.p.startswith("?<", self.i) and self.p[self.i + 2 : self.i + 3] not in ("=", "!")
            ):  # a named group
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.fail("unterminated group name")
                self.i = end + 1
            elif self.peek() == "?":
                raise self.fail("lookaround, backreferences by name and inline flags are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.fail("missing ')'")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", CharSet(((10, 10),), negated=True))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise self.fail(f"nothing to repeat before {c!r}")
        if c in "^$":
            raise self.fail(f"anchor {c!r} inside the pattern is not supported (only at its ends)")
        return ("set", _char(c))

    def escape(self, in_class: bool) -> CharSet:
        if self.peek() is None:
            raise self.fail("pattern ends with a backslash")
        c = self.take()
        if c in _CLASS_ESCAPES:
            return CharSet(_CLASS_ESCAPES[c])
        if c.lower() in _CLASS_ESCAPES:
            if in_class:
                raise self.fail(f"negated class escape \\{c} inside [...] is not supported")
            return CharSet(_CLASS_ESCAPES[c.lower()], negated=True)
        if c in _CHAR_ESCAPES:
            return _char(_CHAR_ESCAPES[c])
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i : self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{c} needs {n} hex digits")
            self.i += n
            return _char(chr(int(digits, 16)))
        if c.isdigit():
            raise self.fail("backreferences are not supported")
        if c in _REFUSED_ESCAPES:
            raise self.fail(f"{_REFUSED_ESCAPES[c]} not supported")
        if c.isalnum():
            raise self.fail(f"unknown escape \\{c}")
        return _char(c)

    def char_class(self) -> CharSet:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.peek() is None:
                raise self.fail("missing ']'")
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                part = self.escape(in_class=True)
                if len(part.ranges) != 1 or part.ranges[0][0] != part.ranges[0][1]:  # \d \w \s: no range from them
                    ranges.extend(part.ranges)
                    continue
                lo = part.ranges[0][0]
            else:
                lo = ord(c)
            if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                d = self.take()
                if d == "\\":
                    part = self.escape(in_class=True)
                    if len(part.ranges) != 1 or part.ranges[0][0] != part.ranges[0][1]:
                        raise self.fail("a class escape cannot end a range")
                    hi = part.ranges[0][0]
                else:
                    hi = ord(d)
                if hi < lo:
                    raise self.fail(f"bad range {chr(lo)}-{chr(hi)}")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return CharSet(tuple(sorted(set(ranges))), negated)


def _build(nfa: _NFA, node) -> tuple[int, int]:
    """Thompson construction: the fragment (start, accept) recognising `node`."""
    kind = node[0]
    if kind == "set":
        s, t = nfa.new(), nfa.new()
        nfa.edges[s].append((node[1], t))
        return s, t
    if kind == "cat":
        s = t = nfa.new()
        for item in node[1]:
            a, b = _build(nfa, item)
            nfa.eps[t].append(a)
            t = b
        return s, t
    if kind == "alt":
        s, t = nfa.new(), nfa.new()
        for option in node[1]:
            a, b = _build(nfa, option)
            nfa.eps[s].append(a)
            nfa.eps[b].append(t)
        return s, t
    _, body, lo, hi = node
    s = t = nfa.new()
    for _ in range(lo):  # the required copies
        a, b = _build(nfa, body)
        nfa.eps[t].append(a)
        t = b
    if hi is None:  # then any number more
        a, b = _build(nfa, body)
        nfa.eps[t].append(a)
        nfa.eps[b].append(a)
        end = nfa.new()
        nfa.eps[t].append(end)
        nfa.eps[b].append(end)
        return s, end
    end = nfa.new()
    nfa.eps[t].append(end)
    for _ in range(hi - lo):  # optional copies, each may stop the repeat
        a, b = _build(nfa, body)
        nfa.eps[t].append(a)
        nfa.eps[b].append(end)
        t = b
    return s, end


class MemoAutomaton:
    """The walk shared by the constrained-decoding automata: `step` memoises the subclass's `_advance` (the state
    set after one character; empty = dead end), `feed` steps through a text. Subclasses give initial, _advance and
    can_finish."""

    def __init__(self) -> None:
        self._memo: dict[tuple[frozenset, str], frozenset] = {}

    def _advance(self, states: frozenset, c: str) -> frozenset:
        raise NotImplementedError

    def step(self, states: frozenset, c: str) -> frozenset:
        key = (states, c)
        nxt = self._memo.get(key)
        if nxt is None:
            nxt = self._advance(states, c)
            if len(self._memo) > 200_000:
                self._memo.clear()
            self._memo[key] = nxt
        return nxt

    def feed(self, states: frozenset, text: str) -> frozenset:
        for c in text:
            states = self.step(states, c)
            if not states:
                break
        return states


class RegexAutomaton(MemoAutomaton):
    """A compiled pattern with the automaton interface of engine/structured.py (initial, step, feed, can_finish):
    states are frozensets of NFA states, closed under empty moves; an empty set is a dead end."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        if not isinstance(pattern, str):
            raise ValueError(f"regex must be a string, got {type(pattern).__name__}")  # noqa: TRY004 - API contract
        self.pattern = pattern
        self._nfa = nfa = _NFA()
        self._start, self._accept = _build(nfa, _Parser(pattern).parse())
        self._distance: list[int] | None = None  # per NFA state, characters to a match (min_chars)
        self._lengths: tuple[list[int], int, int] | None = None  # per NFA state, match lengths (can_complete)
        self._hits: dict[frozenset, int] = {}

    def _closure(self, states) -> frozenset:
        seen, todo = set(states), list(states)
        while todo:
            for nxt in self._nfa.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def initial(self) -> frozenset:
        return self._closure([self._start])

    def _advance(self, states: frozenset, c: str) -> frozenset:
        return self._closure([t for s in states for chars, t in self._nfa.edges[s] if c in chars])

    def can_finish(self, states: frozenset) -> bool:
        return self._accept in states

    def min_chars(self, states: frozenset) -> int:
        """The fewest characters that complete a match from `states` (a large number if none can)."""
        if self._distance is None:
            self._distance = self._distances()
        return min((self._distance[s] for s in states), default=_FAR)

    def can_complete(self, states: frozenset, need: int, room: int) -> bool:
        """Whether a string of need … room more characters takes `states` to a match: a string with a minLength
        and a pattern must not reach a point where it may neither end (too short) nor grow (the pattern done).
        need ≤ 0 is min_chars' test; otherwise the match lengths from each state, which settle into a repeating
        pattern (`_completion_lengths`), are searched over the window."""
        if room < need:
            return False
        if need <= 0:
            return self.min_chars(states) <= room
        if self._lengths is None:
            self._lengths = self._completion_lengths()
        per_state, j, k = self._lengths
        if k < 0:  # the lengths did not repeat within the limits: the shortest match only
            return self.min_chars(states) <= room
        bits = self._hits.get(states)
        if bits is None:
            bits = 0
            for s in states:
                bits |= per_state[s]
            if len(self._hits) > 100_000:
                self._hits.clear()
            self._hits[states] = bits
        if need < k and bits >> need & ((1 << (min(room, k - 1) - need + 1)) - 1):
            return True
        start, period = max(need, k), k - j  # lengths L ≥ k repeat those of j + (L − j) mod period
        if room < start:
            return False
        if room - start + 1 >= period:
            return bool(bits >> j & ((1 << period) - 1))
        return any(bits >> (j + (L - j) % period) & 1 for L in range(start, room + 1))

    def _completion_lengths(self) -> tuple[list[int], int, int]:
        """Per NFA state a bit mask of the lengths L < k of the strings that lead from it to a match, and (j, k):
        the set of states with a length-L match, R_L, is R_(j + (L − j) mod (k − j)) for L ≥ k. R_0 is what
        reaches the accepting state by empty moves; R_(L+1) is what reaches, by empty moves, a state with a
        character move into R_L. Being a function of R_L alone, the sequence repeats; k = -1 if it has not
        within MAX_LAYERS lengths and MAX_VISITS states."""
        n = len(self._nfa.eps)
        back_eps: list[list[int]] = [[] for _ in range(n)]
        back_chr: list[list[int]] = [[] for _ in range(n)]
        for s in range(n):
            for t in self._nfa.eps[s]:
                back_eps[t].append(s)
            for chars, t in self._nfa.edges[s]:
                if chars:
                    back_chr[t].append(s)

        def closure(states: set[int]) -> frozenset:
            todo = list(states)
            while todo:
                for s in back_eps[todo.pop()]:
                    if s not in states:
                        states.add(s)
                        todo.append(s)
            return frozenset(states)

        layer, seen, per_state, visits = closure({self._accept}), {}, [0] * n, 0
        while layer not in seen:
            visits += len(layer)
            if len(seen) >= MAX_LAYERS or visits > MAX_VISITS:
                return per_state, 0, -1
            seen[layer] = L = len(seen)
            for s in layer:
                per_state[s] |= 1 << L
            layer = closure({s for t in layer for s in back_chr[t]})
        return per_state, seen[layer], len(seen)

    def _distances(self) -> list[int]:
        """Per NFA state, the fewest characters to the accepting state: a 0-1 breadth-first search backwards from
        it (empty moves cost 0, character moves 1)."""
        back: list[list[tuple[int, int]]] = [[] for _ in range(len(self._nfa.eps))]
        for s in range(len(back)):
            for t in self._nfa.eps[s]:
                back[t].append((s, 0))
            for _, t in self._nfa.edges[s]:
                back[t].append((s, 1))
        dist = [_FAR] * len(back)
        dist[self._accept] = 0
        todo = deque([self._accept])
        while todo:
            t = todo.popleft()
            for s, cost in back[t]:
                if dist[t] + cost < dist[s]:
                    dist[s] = dist[t] + cost
                    todo.appendleft(s) if cost == 0 else todo.append(s)
        return dist

    def fullmatch(self, text: str) -> bool:
        return self.can_finish(self.feed(self.initial(), text))
