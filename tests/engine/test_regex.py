"""engine/regex.py: the NFA accepts exactly what re.fullmatch accepts, and every state it keeps can still finish."""

from __future__ import annotations

import random
import re

import pytest

from nemotron3.engine import regex as regex_module
from nemotron3.engine.regex import RegexAutomaton

PATTERNS = [
    r"abc", r"a|bc|", r"(ab)*c", r"[a-c]+x?", r"\d{3}-\d{2,4}", r"[^a]b*", r".{2,3}", r"(a|b){0,3}c{1,}",
    r"(?:ab|a)(?:bc|c)", r"x*?y+?", r"^[\w.]+@\w+\.(com|org)$", r"\s*\S+", r"[\]a-]+", r"a{2}b{,2}", r"\x41\u0042",
    r"(?P<n>a+)b", r"[\d\s]+", r"a{", r"a{x}", r"colou?r", r"\.\*\+", r"(yes|no|maybe)", r"-?(0|[1-9]\d*)(\.\d+)?",
]  # fmt: skip
ALPHABET = "abcxy019-@._ \n]{}ACBwo*+rmesnlgu"  # every character the patterns need


def walk(automaton: RegexAutomaton, rng: random.Random, max_len: int = 20) -> str | None:
    """A random text the automaton accepts, built one character at a time through states it keeps alive."""
    states, text = automaton.initial(), ""
    for _ in range(max_len):
        if automaton.can_finish(states) and rng.random() < 0.3:
            return text
        options = [c for c in ALPHABET if automaton.step(states, c)]
        if not options:
            assert automaton.can_finish(states), f"{automaton.pattern!r}: {text!r} is alive but cannot go on or end"
            return text
        c = rng.choice(options)
        text, states = text + c, automaton.step(states, c)
    return text if automaton.can_finish(states) else None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_what_re_fullmatch_matches(pattern):
    rng = random.Random(pattern)
    automaton, reference = RegexAutomaton(pattern), re.compile(pattern)
    for _ in range(1500):  # random texts: mostly rejected by both
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))
        assert automaton.fullmatch(text) == (reference.fullmatch(text) is not None), text
    walked = [walk(automaton, rng) for _ in range(200)]  # texts the automaton accepts: re must too
    walked = [t for t in walked if t is not None]
    assert walked and all(reference.fullmatch(t) for t in walked)


def test_dead_prefixes_are_empty_state_sets():
    automaton = RegexAutomaton(r"\d{3}-\d{4}")
    states = automaton.feed(automaton.initial(), "12")
    assert states and not automaton.can_finish(states)
    assert not automaton.step(states, "x")
    assert automaton.can_finish(automaton.feed(automaton.initial(), "123-4567"))


@pytest.mark.parametrize("pattern, message", [
    (r"(?=a)", "lookaround"), (r"\1", "backreferences"), (r"\bx", "word boundaries"), (r"(?i)a", "inline flags"),
    (r"a++", "possessive"), (r"*a", "nothing to repeat"), (r"[z-a]", "bad range"), (r"a{3,1}", "max < min"),
    (r"(a", "missing ')'"), (r"a)", "unbalanced"), ("a\\", "backslash"), (r"x{5000}", "above 1000"),
    (r"a$b", "anchor"), (r"[\D]", "negated class escape"), (r"[ab", "missing ']'"), (r"\q", "unknown escape"),
])  # fmt: skip
def test_unsupported_or_malformed_patterns_name_the_problem(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RegexAutomaton(pattern)


def test_min_chars_is_the_shortest_completion():
    a = RegexAutomaton(r"ab{2,3}c|(?:x|yyy)z")
    start = a.initial()
    assert a.min_chars(start) == 2  # "xz"
    assert a.min_chars(a.step(start, "a")) == 3  # "bbc"
    assert a.min_chars(a.feed(start, "abbb")) == 1
    assert a.min_chars(a.feed(start, "abbbc")) == 0
    assert a.min_chars(a.feed(start, "y")) == 3  # "yyz"
    assert a.min_chars(frozenset()) > 10**6  # nothing can complete


def completion_lengths_by_search(a: RegexAutomaton, states: frozenset, most: int) -> set[int]:
    """The lengths L ≤ most of the strings over "ab" that take `states` to a match: a breadth-first search over
    the state sets reached after each length (the patterns below only read a and b, so this alphabet is exact)."""
    found, level = set(), {states}
    for L in range(most + 1):
        if any(a.can_finish(s) for s in level):
            found.add(L)
        level = {t for s in level for c in "ab" if (t := a.step(s, c))}
    return found


@pytest.mark.parametrize(
    "pattern",
    [r"a{1,2}|bbbb", r"(ab)*", r"(aaa)+b?", r"a(bb)*a|b{5,}", r"(a|bb){2,3}", r"[ab]{3}(ab){0,2}", r"(?:aa|bbb)*a",
     r"", r"a*b{7}"],
)  # fmt: skip
def test_can_complete_finds_exactly_the_match_lengths_in_a_window(pattern):
    """can_complete(states, need, room) against the lengths found by search, for the start and random prefixes
    and every window within 14 characters: the repeating tail (lengths past the first repeat) included."""
    a, rng = RegexAutomaton(pattern), random.Random(pattern)
    prefixes = [""] + ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(6)]
    for prefix in prefixes:
        states = a.feed(a.initial(), prefix)
        if not states:
            continue
        lengths = completion_lengths_by_search(a, states, 14)
        for need in range(10):
            for room in range(need, 14):
                want = any(need <= L <= room for L in lengths)
                assert a.can_complete(states, need, room) == want, (pattern, prefix, need, room, sorted(lengths))
    assert not a.can_complete(a.initial(), 3, 2)  # an empty window


def test_can_complete_past_the_first_repeat_of_long_periods():
    """Lengths far beyond the layers the automaton stores follow their period: (a{7})+ matches at multiples of 7."""
    a = RegexAutomaton(r"(a{7})+")
    s = a.initial()
    assert a.can_complete(s, 700, 700) and a.can_complete(s, 701, 707) and not a.can_complete(s, 701, 706)
    assert a.can_complete(a.feed(s, "aaa"), 697, 697) and not a.can_complete(a.feed(s, "aaa"), 698, 700)


def test_can_complete_falls_back_to_the_shortest_match_past_its_limits(monkeypatch):
    """Lengths that do not repeat within MAX_LAYERS leave the old test (a match within room), never an error."""
    monkeypatch.setattr(regex_module, "MAX_LAYERS", 3)
    a = RegexAutomaton(r"a{1,2}|bbbb")
    assert a.can_complete(a.initial(), 3, 3)  # "aa" is within room: the fallback does not see it ends too early
    assert not a.can_complete(a.initial(), 3, 0)
