"""JSON-schema `pattern` inside constrained JSON strings: JSON Schema's meaning (re.search on the decoded string),
escapes decoded before the pattern sees them, and samples from the default model that match."""

from __future__ import annotations

import json
import random
import re

import pytest

from nemotron3 import LLM, SamplingParams
from nemotron3.engine.structured import Automaton, compile_schema, search_pattern


def accepts(schema: dict, text: str) -> bool:
    a = Automaton(compile_schema(schema))
    states = a.feed(a.initial(), text)
    return bool(states) and a.can_finish(states)


def alive(schema: dict, text: str) -> bool:
    """Whether `text` is still a prefix of some accepted output."""
    a = Automaton(compile_schema(schema))
    return bool(a.feed(a.initial(), text))


def ecma(pattern: str) -> str:
    """The pattern as JSON Schema (ECMA-262) reads it, for Python's re: a final `$` is the end of the string (re's
    `$` also matches before a final newline)."""
    slashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and slashes % 2 == 0 else pattern


def string(pattern: str) -> dict:
    return {"type": "string", "pattern": pattern}


@pytest.mark.parametrize(
    "pattern",
    [r"^[A-Z]{3}-\d{2}$", r"ab", r"^a", r"b$", r"a\nb", r"^(x|yz)+$", r"\d", r"^$", r"^[^\"]*\\$", r"q/\t"],
)
def test_decoded_strings_are_accepted_exactly_when_re_search_finds_the_pattern(pattern):
    """Random strings over the pattern's alphabet plus JSON's escaped characters, written as JSON strings
    (json.dumps: escapes for quotes, backslashes and control characters), against re.search on the string."""
    rng = random.Random(pattern)
    alphabet = 'ABCxyzab12-q/"\\\n\t '
    schema = string(pattern)
    matched = 0
    for _ in range(400):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        if rng.random() < 0.3:  # strings that match, built around a witness of the pattern
            s = {"^[A-Z]{3}-\\d{2}$": "ABC-12", "ab": s + "ab", "^a": "a" + s, "b$": s + "b", "a\\nb": "xa\nb",
                 "^(x|yz)+$": "xyzx", "\\d": s + "1", "^$": "", '^[^\\"]*\\\\$': "ab\\", "q/\\t": "q/\t"}[pattern]  # fmt: skip
        want = re.search(ecma(pattern), s) is not None
        matched += want
        assert accepts(schema, json.dumps(s, ensure_ascii=False)) == want, (pattern, s)
    assert matched > 20  # both outcomes are exercised


def test_a_string_that_cannot_match_is_refused_as_it_is_written():
    schema = {"type": "object", "properties": {"code": string(r"^[A-Z]{3}-\d{2}$")}}
    assert accepts(schema, '{"code":"ABC-12"}')
    assert alive(schema, '{"code":"AB')
    assert not alive(schema, '{"code":"ABc')  # dead at the first character the pattern cannot take
    assert not alive(schema, '{"code":"ABC-1"')  # the closing quote before the pattern is done
    assert not accepts(schema, '{"code":"ABC-123"}')


def test_a_pattern_must_still_fit_in_the_characters_left():
    schema = {"type": "string", "pattern": "ing", "maxLength": 5}
    assert alive(schema, '"ab')  # 2 characters, 3 left: "ing" still fits
    assert not alive(schema, '"abc')  # 3 characters, 2 left: it does not
    assert accepts(schema, '"abing"')
    assert alive(schema, '"a\\n') and not alive(schema, '"a\\nb')  # an escape is one character of the string
    with pytest.raises(ValueError, match="cannot match a string of at most 2 characters"):
        compile_schema({"type": "string", "pattern": "ing", "maxLength": 2})


def test_search_pattern_anchors():
    assert search_pattern("a") == "(?:.|\n)*(?:a)(?:.|\n)*"
    assert search_pattern("^a$") == "(?:a)"
    assert search_pattern(r"a\$") == "(?:.|\n)*(?:a\\$)(?:.|\n)*"  # an escaped dollar is a character
    assert search_pattern(r"a\\$") == "(?:.|\n)*(?:a\\\\)"  # an escaped backslash, then the anchor


def test_patterns_the_regex_engine_refuses_are_left_unenforced_and_bad_ones_are_errors():
    lookahead = string(r"^(?=a)\w+$")  # Python compiles it; engine/regex.py refuses lookaround
    assert accepts(lookahead, '"zzz"')
    with pytest.raises(ValueError, match="regex"):
        compile_schema(string("(["))
    with pytest.raises(ValueError, match="is not of type .string."):  # jsonschema checks the schema first
        compile_schema(string(3))


def test_samples_from_the_default_model_follow_the_pattern():
    llm = LLM("default", kv_cache_memory_bytes=64 << 20)
    note = {**string("ing"), "maxLength": 10}  # past 7 characters without "ing", only "ing" can follow
    schema = {"type": "object", "properties": {"id": string(r"^[A-Z]{2}\d{3}$"), "note": note},
              "required": ["id", "note"]}  # fmt: skip
    params = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=60, structured_outputs={"json": schema})
    (out,) = llm.generate(["A ticket:"], params)
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)
        assert re.search(r"^[A-Z]{2}\d{3}$", value["id"]) and re.search("ing", value["note"]), c.text


def test_unicode_escapes_are_one_decoded_character():
    """\\uXXXX escapes (either case of hex, surrogate pairs) are generated as json.loads reads them: one character
    of the string for its length and its pattern; a lone or reversed surrogate, or a short escape, is refused."""
    one = {"type": "string", "minLength": 1, "maxLength": 1}
    for text in ['"\\u00e9"', '"\\u00E9"', '"\\u0000"', '"\\ud83d\\ude00"', '"\\uD83D\\uDE00"', '"\\u20ac"']:
        assert len(json.loads(text)) == 1 and accepts(one, text), text
    for text in ['"\\ud83d"', '"\\ude00"', '"\\ude00\\ud83d"', '"\\u00e"', '"\\u00g9"', '"\\ud83d\\u0041"', '"\\x41"']:
        assert not accepts(one, text), text
    assert not accepts(one, '"\\u0041\\u0042"')  # two characters
    assert alive(one, '"\\ud83d\\u') and not alive(one, '"\\ud83dx')
    assert accepts(string(r"^é€$"), '"\\u00e9\\u20AC"') and not accepts(string(r"^é€$"), '"\\u00e9\\u20AD"')
    assert accepts(string("\U0001f600"), '"a\\ud83d\\ude00"')  # the pair decodes before the pattern sees it


def test_unicode_escapes_match_json_loads_on_random_strings():
    """Random code points (controls, BMP, astral) written with ensure_ascii=True (every non-ASCII character as
    \\uXXXX, astral ones as surrogate pairs) are accepted under a maxLength of exactly their decoded length,
    and refused under one less."""
    rng = random.Random(7)
    for _ in range(60):
        chars = [chr(rng.choice([rng.randrange(0x20), rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
                 for _ in range(rng.randint(1, 5))]  # fmt: skip
        s = "".join(chars)
        text = json.dumps(s, ensure_ascii=True)
        assert accepts({"type": "string", "maxLength": len(s)}, text), text
        assert not accepts({"type": "string", "maxLength": len(s) - 1}, text), text


@pytest.mark.parametrize(
    ("pattern", "lo", "hi"), [(r"^(a{1,2}|bbbb)$", 3, 10), (r"^(ab)*$", 3, 7), (r"^a(bb)*a$", 5, 9), (r"ab", 4, 4)]
)
def test_min_length_with_a_pattern_leaves_no_dead_ends(pattern, lo, hi):
    """Every character the automaton allows keeps a way to end: random walks over "ab and the closing quote never
    reach a string that may neither end (shorter than minLength) nor grow (the pattern done), and each ends in a
    string of lo … hi characters that re.search matches. Before can_complete, "aa" was such a dead end."""
    schema = {"type": "string", "pattern": pattern, "minLength": lo, "maxLength": hi}
    a, rng = Automaton(compile_schema(schema)), random.Random(pattern)
    for _ in range(200):
        states, text = a.feed(a.initial(), '"'), '"'
        while not a.can_finish(states):
            options = [c for c in 'ab"' if a.feed(states, c)]
            assert options, f"{text!r} is a dead end"
            c = rng.choice(options)
            states, text = a.feed(states, c), text + c
        s = json.loads(text)
        assert lo <= len(s) <= hi and re.search(ecma(pattern), s), text


def test_a_pattern_that_cannot_meet_min_length_is_an_error():
    with pytest.raises(ValueError, match="cannot match a string of 3 to 1024 characters"):
        compile_schema({"type": "string", "pattern": "^a{1,2}$", "minLength": 3})
