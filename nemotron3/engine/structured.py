"""Structured outputs by constrained decoding: JSON (a schema, or any object), a regex, or a choice of strings.

A JSON Schema is compiled to a small grammar; a character-level, non-deterministic prefix automaton walks
it (a regex or a choice compiles to an NFA instead, engine/regex.py); a trie of the tokenizer's vocabulary is
searched with the automaton at every step so that only tokens that keep the output a valid prefix are allowed
(`StructuredLogitsProcessor`, plugged into the engine through `SamplingParams.logits_processors`; the engine
builds one per sample from `SamplingParams.structured_outputs`, the server from `response_format` and vLLM's
`structured_outputs` / `guided_*` fields). When the output is complete only end-of-sequence is allowed.

What the grammar enforces:
- compact JSON (no whitespace outside strings), valid string escapes (\\uXXXX included: a surrogate pair is one
  character, a lone surrogate is refused, as json.loads would make it an unencodable string), valid numbers;
- json_object: any JSON object (nesting depth ≤ 6, ≤ 32 members per object, ≤ 64 items per array);
- json_schema: type (incl. lists of types), properties (all declared properties are emitted, in order, so
  `required` always holds), items, enum, const, anyOf / oneOf (oneOf as anyOf), allOf of one schema,
  $ref into #/$defs or #/definitions, minLength / maxLength, minItems / maxItems, and pattern: the string's
  decoded characters (escapes decoded) walk the pattern's automaton (engine/regex.py), with JSON Schema's
  meaning, a match anywhere in the string unless anchored by ^ / $ (`search_pattern`), and only characters
  after which a match of minLength … maxLength characters stays possible are allowed (no dead ends; a pattern
  that cannot meet the lengths at all is a ValueError). Strings without
  maxLength are capped at 1024 characters, arrays without maxItems at 64 items, numbers at 24 characters,
  so that a constrained output always ends.
- Not enforced (accepted, documented): a pattern that Python's `re` compiles but engine/regex.py refuses
  (lookaround, backreferences, word boundaries), format, minimum / maximum / multipleOf,
  additionalProperties beyond the declared ones (none are generated), uniqueItems.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from nemotron3.engine.regex import MemoAutomaton, RegexAutomaton, regex_escape

MAX_DEPTH = 6
MAX_MEMBERS = 32
MAX_ITEMS = 64
MAX_STRING = 1024
MAX_KEY = 64
MAX_NUMBER = 24

_INT_PREFIX = re.compile(r"-?(?:0|[1-9]\d*)?")
_INT_DONE = re.compile(r"-?(?:0|[1-9]\d*)")
_NUM_PREFIX = re.compile(r"-?(?:(?:0|[1-9]\d*)(?:\.\d*)?(?:(?<=\d)[eE][+-]?\d*)?)?")
_NUM_DONE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_UNESCAPE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")


# ------------------------------------------------------------------------------------------ grammar nodes
@dataclass(eq=False)
class Node:
    """kind: lit | str | num | arr | obj | fobj | any | union (identity-hashed: frames hold them)."""

    kind: str
    texts: tuple = ()  # lit: the allowed JSON texts
    min_len: int = 0  # str / arr
    max_len: int = MAX_STRING
    integer: bool = False  # num
    item: Node | None = None  # arr
    props: tuple = ()  # obj: ((key, Node), ...)
    options: tuple = ()  # union
    depth: int = 0  # any / fobj
    pattern: RegexAutomaton | None = None  # str: the schema's pattern (search_pattern), or None


_ANY: dict[int, Node] = {}
_FREE_ARR: dict[int, Node] = {}


def any_node(depth: int = 0) -> Node:
    if depth not in _ANY:
        _ANY[depth] = Node("any", depth=depth)
    return _ANY[depth]


def _free_array(depth: int) -> Node:
    if depth not in _FREE_ARR:
        _FREE_ARR[depth] = Node("arr", min_len=0, max_len=MAX_ITEMS, item=any_node(depth + 1))
    return _FREE_ARR[depth]


def json_object_grammar() -> Node:
    """response_format {"type": "json_object"}: any JSON object."""
    return Node("fobj", depth=0)


def compile_schema(schema) -> Node:
    """JSON Schema → grammar; ValueError for an invalid or unsupported schema (message names the problem)."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")  # noqa: TRY004
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a serve dependency
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"invalid JSON schema: {e.message}") from None
    return _compile(schema, schema, 0)


def _compile(s, root, depth: int) -> Node:
    if depth > 32:
        raise ValueError("JSON schema nests too deeply (recursive $ref?)")
    if s is True or s == {}:
        return any_node(0)
    if s is False:
        raise ValueError("JSON schema `false` matches nothing")
    if "$ref" in s:
        return _compile(_resolve(s["$ref"], root), root, depth + 1)
    if "const" in s:
        return Node("lit", texts=(_dump(s["const"]),))
    if "enum" in s:
        if not s["enum"]:
            raise ValueError("JSON schema enum is empty")
        return Node("lit", texts=tuple(_dump(v) for v in s["enum"]))
    for key in ("anyOf", "oneOf"):
        if key in s:
            return Node("union", options=tuple(_compile(x, root, depth + 1) for x in s[key]))
    if "allOf" in s:
        if len(s["allOf"]) != 1:
            raise ValueError("JSON schema allOf with more than one schema is not supported")
        return _compile(s["allOf"][0], root, depth + 1)
    pattern = _pattern(s["pattern"]) if "pattern" in s else None
    t = s.get("type")
    if isinstance(t, list):
        return Node("union", options=tuple(_compile({**s, "type": x}, root, depth + 1) for x in t))
    if t is None:
        t = "object" if "properties" in s else "array" if "items" in s else None
    if t is None:
        return any_node(0)
    if t == "string":
        lo, hi = int(s.get("minLength", 0)), int(s.get("maxLength", MAX_STRING))
        if hi < lo:
            raise ValueError("JSON schema maxLength < minLength")
        if pattern is not None and not pattern.can_complete(pattern.initial(), lo, hi):
            span = f"at most {hi}" if lo == 0 else f"{lo} to {hi}"
            raise ValueError(f"JSON schema pattern {s['pattern']!r} cannot match a string of {span} characters")
        return Node("str", min_len=lo, max_len=hi, pattern=pattern)
    if t in ("integer", "number"):
        return Node("num", integer=t == "integer")
    if t == "boolean":
        return Node("lit", texts=("true", "false"))
    if t == "null":
        return Node("lit", texts=("null",))
    if t == "array":
        items = s.get("items")
        item = (
            _compile(items, root, depth + 1) if isinstance(items, (dict, bool)) and items is not True else any_node(1)
        )
        lo, hi = int(s.get("minItems", 0)), int(s.get("maxItems", MAX_ITEMS))
        if hi < lo:
            raise ValueError("JSON schema maxItems < minItems")
        return Node("arr", min_len=lo, max_len=hi, item=item)
    if t == "object":
        props = s.get("properties") or {}
        if not props:
            return Node("fobj", depth=0)
        return Node("obj", props=tuple((k, _compile(v, root, depth + 1)) for k, v in props.items()))
    raise ValueError(f"JSON schema type {t!r} is not supported")


def search_pattern(pattern: str) -> str:
    """JSON Schema's `pattern` (ECMA-262: found anywhere in the string unless anchored) as a full-match pattern for
    engine/regex.py: any text, newlines included, on each side that has no ^ / $ anchor."""
    body, anywhere = pattern, "(?:.|\n)*"
    head = "" if body.startswith("^") else anywhere
    body = body[1:] if head == "" else body
    trailing_slashes = len(body[:-1]) - len(body[:-1].rstrip("\\"))
    anchored_end = body.endswith("$") and trailing_slashes % 2 == 0
    body = body[:-1] if anchored_end else body
    return f"{head}(?:{body}){'' if anchored_end else anywhere}"


def _pattern(pattern) -> RegexAutomaton | None:
    """The automaton of a schema's `pattern`; None where engine/regex.py cannot express a pattern that Python's re
    compiles (left unenforced, as documented); a pattern that is no regex at all is a ValueError."""
    if not isinstance(pattern, str):
        raise ValueError(f"JSON schema pattern must be a string, got {type(pattern).__name__}")  # noqa: TRY004
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"JSON schema pattern {pattern!r} is not a valid regex: {e}") from None
    try:
        return RegexAutomaton(search_pattern(pattern))
    except ValueError:
        return None


def _resolve(ref: str, root):
    for prefix in ("#/$defs/", "#/definitions/"):
        if isinstance(ref, str) and ref.startswith(prefix):
            target = root.get(prefix[2:-1], {}).get(ref[len(prefix) :])
            if target is None:
                raise ValueError(f"JSON schema $ref {ref!r} does not resolve")
            return target
    if ref == "#":
        return root
    raise ValueError(f"JSON schema $ref {ref!r} is not supported (only #, #/$defs/..., #/definitions/...)")


def _dump(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------------------ the automaton
# A state is a frozenset of stacks (the automaton is non-deterministic: unions, literal choices, numbers
# that may end); a stack is a tuple of frames, the top last. Frames:
#   ("V", node)                  a value of `node` comes next
#   ("L", texts, pos)            inside one of the literal texts, `pos` characters matched
#   ("S", min, max, n, escape, pattern, states)  inside a string, n characters so far (escape: the escape written
#                                so far, "" outside one; pattern: None or its automaton)
#   ("N", integer, text)         inside a number
#   ("O", node, i)               schema object: property i's value is done
#   ("FO", depth, count, phase)  free object: phase start | key | after
#   ("A", node, count, phase)    array: phase start | after


def _step(stack: tuple, c: str) -> list[tuple]:
    if not stack:
        return []
    top, rest = stack[-1], stack[:-1]
    k = top[0]
    if k == "V":
        return _expand(rest, top[1], c)
    if k == "L":
        texts, pos = top[1], top[2]
        keep = tuple(t for t in texts if len(t) > pos and t[pos] == c)
        out = []
        if any(len(t) == pos + 1 for t in keep):
            out.append(rest)
        more = tuple(t for t in keep if len(t) > pos + 1)
        if more:
            out.append(rest + (("L", more, pos + 1),))
        return out
    if k == "S":  # ("S", min, max, characters so far, the escape so far, pattern automaton or None, its states)
        _, lo, hi, n, esc, rx, rs = top
        if esc:
            step = _escape_step(esc, c)
            if step is None:
                return []
            esc, ch = step
            if ch is None:  # inside a \uXXXX escape
                return [rest + (("S", lo, hi, n, esc, rx, rs),)]
            rs = _pattern_step(rx, rs, ch, lo - n - 1, hi - n - 1)
            return [rest + (("S", lo, hi, n + 1, "", rx, rs),)] if rs else []
        if c == '"':
            return [rest] if n >= lo and (rx is None or rx.can_finish(rs)) else []
        if n >= hi or ord(c) < 0x20:
            return []
        if c == "\\":
            return [rest + (("S", lo, hi, n, "\\", rx, rs),)]
        rs = _pattern_step(rx, rs, c, lo - n - 1, hi - n - 1)
        return [rest + (("S", lo, hi, n + 1, "", rx, rs),)] if rs else []
    if k == "N":
        _, integer, text = top
        out = []
        nxt = text + c
        if len(nxt) <= MAX_NUMBER and (_INT_PREFIX if integer else _NUM_PREFIX).fullmatch(nxt):
            out.append(rest + (("N", integer, nxt),))
        if (_INT_DONE if integer else _NUM_DONE).fullmatch(text):
            out.extend(_step(rest, c))
        return out
    if k == "O":
        _, node, i = top
        if i + 1 < len(node.props):
            if c != ",":
                return []
            key, sub = node.props[i + 1]
            return [rest + (("O", node, i + 1), ("V", sub), ("L", (_dump(key) + ":",), 0))]
        return [rest] if c == "}" else []
    if k == "FO":
        _, depth, count, phase = top
        if c == '"' and phase in ("start", "key") and count < MAX_MEMBERS:
            return [rest + (("FO", depth, count + 1, "after"), ("V", any_node(depth + 1)), ("L", (":",), 0),
                            _string(0, MAX_KEY))]  # fmt: skip
        if c == "}" and phase in ("start", "after"):
            return [rest]
        if c == "," and phase == "after":
            return [rest + (("FO", depth, count, "key"),)]
        return []
    if k == "A":
        _, node, count, phase = top
        if phase == "after":
            if c == "]" and count >= node.min_len:
                return [rest]
            if c == "," and count < node.max_len:
                return [rest + (("A", node, count + 1, "after"), ("V", node.item))]
            return []
        out = [rest] if c == "]" and node.min_len == 0 else []
        if node.max_len >= 1:
            out.extend(_expand(rest + (("A", node, 1, "after"),), node.item, c))
        return out
    raise AssertionError(k)


def _escape_step(pending: str, c: str) -> tuple[str, str | None] | None:
    """One more character of a string escape, `pending` being the escape written so far from its backslash:
    (the longer escape, None) while it goes on, ("", the decoded character) when it ends, None where JSON has
    no such escape. A high surrogate (\\uD800-\\uDBFF) waits for its low half (\\uDC00-\\uDFFF), and the pair
    decodes to one character, as json.loads reads it; a lone surrogate of either half is refused."""
    if len(pending) == 1:  # just after the backslash
        if c in _UNESCAPE:
            return "", _UNESCAPE[c]
        return ("\\u", None) if c == "u" else None
    if len(pending) in (6, 7):  # a high surrogate written: its low half must follow as \u…
        return (pending + c, None) if c == "\\u"[len(pending) - 6] else None
    if c not in _HEX:
        return None
    pending += c
    if len(pending) == 6:
        code = int(pending[2:6], 16)
        if 0xD800 <= code < 0xDC00:
            return pending, None
        return None if 0xDC00 <= code < 0xE000 else ("", chr(code))
    if len(pending) == 12:
        low = int(pending[8:], 16)
        if not 0xDC00 <= low < 0xE000:
            return None
        return "", chr(0x10000 + ((int(pending[2:6], 16) - 0xD800) << 10) + (low - 0xDC00))
    return pending, None


def _pattern_step(rx: RegexAutomaton | None, states: frozenset, ch: str, need: int, room: int) -> frozenset:
    """A string's pattern states after one more (decoded) character, or an empty set (a dead end) when no match
    of the pattern is `need` … `room` characters away (the string's minLength and maxLength less what it has);
    no pattern: unchanged."""
    if rx is None:
        return states
    states = rx.step(states, ch)
    return states if states and rx.can_complete(states, need, room) else frozenset()


def _string(lo: int, hi: int, pattern: RegexAutomaton | None = None) -> tuple:
    """The frame of a string just opened: lo … hi characters, matching `pattern` if given."""
    return ("S", lo, hi, 0, "", pattern, pattern.initial() if pattern is not None else frozenset([0]))


def _expand(rest: tuple, node: Node, c: str) -> list[tuple]:
    kind = node.kind
    if kind == "lit":
        return _step(rest + (("L", node.texts, 0),), c)
    if kind == "str":
        return [rest + (_string(node.min_len, node.max_len, node.pattern),)] if c == '"' else []
    if kind == "num":
        return [rest + (("N", node.integer, c),)] if (c == "-" or c.isdigit()) and c.isascii() else []
    if kind == "arr":
        return [rest + (("A", node, 0, "start"),)] if c == "[" else []
    if kind == "fobj":
        return [rest + (("FO", node.depth, 0, "start"),)] if c == "{" else []
    if kind == "obj":
        if c != "{":
            return []
        key, sub = node.props[0]
        return [rest + (("O", node, 0), ("V", sub), ("L", (_dump(key) + ":",), 0))]
    if kind == "union":
        return [s for opt in node.options for s in _expand(rest, opt, c)]
    if kind == "any":
        d = node.depth
        if c == '"':
            return [rest + (_string(0, MAX_STRING),)]
        if c == "-" or (c.isdigit() and c.isascii()):
            return [rest + (("N", False, c),)]
        if c in "tfn":
            return _step(rest + (("L", ("true", "false", "null"), 0),), c)
        if d < MAX_DEPTH and c == "{":
            return [rest + (("FO", d, 0, "start"),)]
        if d < MAX_DEPTH and c == "[":
            return [rest + (("A", _free_array(d), 0, "start"),)]
        return []
    raise AssertionError(kind)


class Automaton(MemoAutomaton):
    """Sets of stacks, with memoised transitions."""

    def __init__(self, root: Node) -> None:
        super().__init__()
        self.root = root

    def initial(self) -> frozenset:
        return frozenset([(("V", self.root),)])

    def _advance(self, states: frozenset, c: str) -> frozenset:
        return frozenset(s for st in states for s in _step(st, c))

    @staticmethod
    def can_finish(states: frozenset) -> bool:
        for st in states:
            if not st:
                return True
            if len(st) == 1 and st[0][0] == "N" and (_INT_DONE if st[0][1] else _NUM_DONE).fullmatch(st[0][2]):
                return True
        return False


# ------------------------------------------------------------------------------------------ vocabulary
class VocabIndex:
    """Each token's text (decoded alone) in a character trie; tokens with no text or partial UTF-8 left out."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.texts: dict[int, str] = {}
        self.root: dict = {}
        n = min(vocab_size, tokenizer.vocab_size)
        for tid in range(n):
            text = tokenizer.decode([tid])
            if not text or "\ufffd" in text:
                continue
            self.texts[tid] = text
            node = self.root
            for ch in text:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(tid)

    def allowed(self, automaton: Automaton, states: frozenset) -> list[int]:
        """Every token whose whole text keeps the automaton alive from `states`."""
        out: list[int] = []
        todo = [(self.root, states)]
        while todo:
            node, st = todo.pop()
            for ch, child in node.items():
                if ch is None:
                    continue
                nxt = automaton.step(st, ch)
                if nxt:
                    out.extend(child.get(None, ()))
                    todo.append((child, nxt))
        return out


_INDEX_CACHE: dict[tuple[int, int], VocabIndex] = {}


def vocab_index(tokenizer, vocab_size: int) -> VocabIndex:
    key = (id(tokenizer), vocab_size)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = VocabIndex(tokenizer, vocab_size)
    return _INDEX_CACHE[key]


def build_automaton(spec) -> Automaton | RegexAutomaton:
    """The automaton for a StructuredOutputsParams (exactly one field set; sampling_params.py checks that):
    a JSON Schema, any JSON object, a regex, or one of the given strings. Bad schemas and patterns are ValueErrors."""
    if spec.json is not None:
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"json is not a valid JSON Schema document: {e}") from None
        return Automaton(compile_schema(schema))
    if spec.json_object:
        return Automaton(json_object_grammar())
    if spec.regex is not None:
        return RegexAutomaton(spec.regex)
    return RegexAutomaton("|".join(regex_escape(c) for c in spec.choice))


def processor_factory(spec, tokenizer, vocab_size: int, eos_ids, think_end_id: int | None = None):
    """For a StructuredOutputsParams: a function `make(in_span=False)` giving one sample a fresh processor (inactive
    while the sample is still reasoning, until `</think>`). The spec's automaton, compiled once, and the vocabulary
    index are shared: neither holds per-sample state. The engine and the server both build constraints here."""
    automaton = spec.automaton()
    index = vocab_index(tokenizer, vocab_size)

    def make(in_span: bool = False) -> StructuredLogitsProcessor:
        return StructuredLogitsProcessor(automaton, index, eos_ids, active=not in_span, think_end_id=think_end_id)

    return make


class StructuredLogitsProcessor:
    """Constrains one sequence's tokens to an automaton's language, then to end-of-sequence once it is complete.

    active=False: the sequence is still reasoning; the constraint starts after the `</think>` token.
    """

    def __init__(
        self, automaton: Automaton | RegexAutomaton, index: VocabIndex, eos_ids, *, active: bool = True,
        think_end_id: int | None = None,
    ) -> None:  # fmt: skip
        self.automaton = automaton
        self.index = index
        self.eos_ids = sorted(set(eos_ids))
        self.states = self.automaton.initial()
        self.active = active
        self.think_end_id = think_end_id
        self._allowed_cache: dict[frozenset, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        mask = self._allowed_cache.get(self.states)
        if mask is None:
            ids = self.index.allowed(self.automaton, self.states)
            if self.automaton.can_finish(self.states) or not ids:
                ids = ids + self.eos_ids
            mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
            mask[[i for i in ids if i < logits.shape[-1]]] = True
            if len(self._allowed_cache) > 256:
                self._allowed_cache.clear()
            self._allowed_cache[self.states] = mask
        return logits.masked_fill(~mask.to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self.active:
            if token_id == self.think_end_id:
                self.active = True
            return
        text = self.index.texts.get(token_id)
        if text is not None:
            self.states = self.automaton.feed(self.states, text)
