"""Validate a recall request's ``filter`` with our own small grammar before Milvus sees it.

Milvus Lite 2.5 silently ignores trailing junk in a filter (``item_id < 1000 adn item_id > 500``
and ``item_id < 0; drop`` return results as if the tail were absent), and the Milvus server and
Lite do not agree on what they accept. So every filter is parsed here, identically for both
engines, and only the canonical expression re-rendered from the parse tree is sent on; anything
else is a :class:`RequestError` naming the problem and its character position (1-based).

Grammar (a subset of Milvus boolean expressions over INT64 scalar fields; keywords are
case-insensitive, field names are case-sensitive)::

    expr       := and_expr (("or" | "||") and_expr)*
    and_expr   := unary (("and" | "&&") unary)*
    unary      := ("not" | "!") unary | "(" expr ")" | comparison
    comparison := FIELD OP INT | INT OP FIELD | FIELD ["not"] "in" "[" INT ("," INT)* [","] "]"
    OP         := "==" | "!=" | "<" | "<=" | ">" | ">="
    INT        := ["-"] DIGITS, within the signed 64-bit range

Canonical form: single spaces; lower-case ``and``/``or``/``not``/``in``; the field always on the
left (``5 < x`` becomes ``x > 5``); integers in plain decimal (``007`` -> ``7``, ``-0`` -> ``0``);
lists as ``[1, 2, 3]``; the operand of ``not`` always in parentheses (``not (x == 1)``); chains
of one operator flattened; parentheses elsewhere only where needed, i.e. around an ``or`` chain
that is an operand of ``and`` (``and`` binds tighter than ``or``).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass

from .errors import RequestError

MAX_LENGTH = 4096
MAX_LIST_VALUES = 1000
MAX_DEPTH = 32
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_DIGITS = frozenset("0123456789")
_IDENT_CHARS = _IDENT_START | _DIGITS
_WORD_CHARS = _IDENT_CHARS | {"."}  # what a malformed number (1.5, 1e3, 0x1f) runs on with
_WHITESPACE = frozenset(" \t\r\n")
_KEYWORDS = {"and": "AND", "or": "OR", "not": "NOT", "in": "IN"}
_PUNCT = {"(": "LPAREN", ")": "RPAREN", "[": "LBRACK", "]": "RBRACK", ",": "COMMA"}
_CMP_OPS = ("==", "!=", "<", "<=", ">", ">=")
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_EXPECT_OP = "a comparison operator (==, !=, <, <=, >, >=), 'in' or 'not in'"
_EXPECT_OPERAND = "a field name, 'not' or '('"


@dataclass(frozen=True)
class _Token:
    kind: str  # IDENT INT OP AND OR NOT IN LPAREN RPAREN LBRACK RBRACK COMMA END
    text: str
    pos: int  # 1-based character position
    value: int = 0


@dataclass(frozen=True)
class _Cmp:
    field: str
    op: str
    value: int


@dataclass(frozen=True)
class _In:
    field: str
    values: tuple[int, ...]
    negated: bool


@dataclass(frozen=True)
class _Not:
    operand: _Node


@dataclass(frozen=True)
class _Chain:
    op: str  # "and" | "or"
    operands: tuple[_Node, ...]


_Node = _Cmp | _In | _Not | _Chain


def _fail(message: str) -> RequestError:
    return RequestError(f"filter: {message}")


def _show(text: str, limit: int = 40) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text) if text.isprintable() else ascii(text)


def _tokenize(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        pos = i + 1
        if ch in _WHITESPACE:
            i += 1
        elif ch in _IDENT_START:
            j = i + 1
            while j < n and expr[j] in _IDENT_CHARS:
                j += 1
            word = expr[i:j]
            tokens.append(_Token(_KEYWORDS.get(word.lower(), "IDENT"), word, pos))
            i = j
        elif ch in _DIGITS or (ch == "-" and i + 1 < n and expr[i + 1] in _DIGITS):
            j = i + 1
            while j < n and expr[j] in _DIGITS:
                j += 1
            k = j
            while k < n and expr[k] in _WORD_CHARS:
                k += 1
            if k > j:
                raise _fail(f"{_show(expr[i:k])} at character {pos} is not an integer "
                            "(only INT64 values are supported)")
            text = expr[i:j]
            digits = text.lstrip("-").lstrip("0")
            value = int(text) if len(digits) <= 19 else INT64_MAX + 1
            if not INT64_MIN <= value <= INT64_MAX:
                shown = text if len(text) <= 30 else text[:30] + "..."
                raise _fail(f"integer {shown} at character {pos} is out of the INT64 range "
                            f"[{INT64_MIN}, {INT64_MAX}]")
            tokens.append(_Token("INT", text, pos, value))
            i = j
        elif expr.startswith(("==", "!=", "<=", ">="), i):
            tokens.append(_Token("OP", expr[i:i + 2], pos))
            i += 2
        elif ch in "<>":
            tokens.append(_Token("OP", ch, pos))
            i += 1
        elif expr.startswith("&&", i):
            tokens.append(_Token("AND", "&&", pos))
            i += 2
        elif expr.startswith("||", i):
            tokens.append(_Token("OR", "||", pos))
            i += 2
        elif ch == "!":
            tokens.append(_Token("NOT", "!", pos))
            i += 1
        elif ch in _PUNCT:
            tokens.append(_Token(_PUNCT[ch], ch, pos))
            i += 1
        elif ch in "'\"`":
            raise _fail(f"string literals are not supported (quote at character {pos}); "
                        "fields are INT64")
        elif ch == "=":
            raise _fail(f"unexpected '=' at character {pos}; use '==' to compare")
        else:
            hint = {"&": "; use '&&' or 'and'", "|": "; use '||' or 'or'"}.get(ch, "")
            raise _fail(f"unexpected {_show(ch)} at character {pos}{hint}")
    tokens.append(_Token("END", "", n + 1))
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token], fields: Collection[str]) -> None:
        self.tokens = tokens
        self.i = 0
        self.fields = fields
        self.depth = 0
        self.list_values = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def unexpected(self, expected: str) -> RequestError:
        tok = self.tok
        if tok.kind == "END":
            return _fail(f"unexpected end at character {tok.pos}; expected {expected}")
        return _fail(f"unexpected {_show(tok.text)} at character {tok.pos}; expected {expected}")

    def parse(self) -> _Node:
        node = self.parse_or()
        if self.tok.kind == "RPAREN":
            raise _fail(f"')' at character {self.tok.pos} has no matching '('")
        if self.tok.kind != "END":
            raise self.unexpected("'and', 'or' or the end")
        return node

    def parse_or(self) -> _Node:
        operands = [self.parse_and()]
        while self.tok.kind == "OR":
            self.advance()
            operands.append(self.parse_and())
        return _chain("or", operands)

    def parse_and(self) -> _Node:
        operands = [self.parse_unary()]
        while self.tok.kind == "AND":
            self.advance()
            operands.append(self.parse_unary())
        return _chain("and", operands)

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _fail(f"nesting deeper than {MAX_DEPTH} levels at character {tok.pos} "
                        f"(the limit is {MAX_DEPTH})")

    def parse_unary(self) -> _Node:
        tok = self.tok
        if tok.kind == "NOT":
            self.advance()
            self.enter(tok)
            # 'not (' is one level, as in the canonical form 'not (x == 1)'.
            paren = self.tok.kind == "LPAREN"
            node = _Not(self.parse_group(nested=False) if paren else self.parse_unary())
            self.depth -= 1
            return node
        if tok.kind == "LPAREN":
            return self.parse_group(nested=True)
        return self.parse_comparison()

    def parse_group(self, nested: bool) -> _Node:
        opening = self.advance()
        if nested:
            self.enter(opening)
        node = self.parse_or()
        if self.tok.kind == "END":
            raise _fail(f"'(' at character {opening.pos} is never closed")
        if self.tok.kind != "RPAREN":
            raise self.unexpected("'and', 'or' or ')'")
        self.advance()
        if nested:
            self.depth -= 1
        return node

    def parse_field(self) -> str:
        tok = self.tok
        if tok.kind != "IDENT":
            raise self.unexpected(_EXPECT_OPERAND)
        if self.tokens[self.i + 1].kind == "LPAREN":
            raise _fail(f"function calls are not supported ({_show(tok.text + '(')} at character {tok.pos})")
        if tok.text not in self.fields:
            names = sorted(self.fields)
            close = [n for n in names if n.lower() == tok.text.lower()]
            close = close or difflib.get_close_matches(tok.text, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none"
            raise _fail(f"unknown field {_show(tok.text)} at character {tok.pos}{hint} (fields: {listed})")
        self.advance()
        return tok.text

    def parse_int(self) -> int:
        if self.tok.kind != "INT":
            raise self.unexpected("an integer")
        return self.advance().value

    def parse_comparison(self) -> _Node:
        if self.tok.kind == "INT":
            value = self.advance().value
            if self.tok.kind != "OP":
                raise self.unexpected("a comparison operator (==, !=, <, <=, >, >=)")
            op = self.advance().text
            return _Cmp(self.parse_field(), _FLIP[op], value)
        field = self.parse_field()
        if self.tok.kind == "OP":
            op = self.advance().text
            if self.tok.kind == "IDENT":
                raise self.unexpected("an integer (fields can only be compared with integers)")
            return _Cmp(field, op, self.parse_int())
        negated = self.tok.kind == "NOT"
        if negated:
            self.advance()
            if self.tok.kind != "IN":
                raise self.unexpected("'in'")
        if self.tok.kind != "IN":
            raise self.unexpected(_EXPECT_OP)
        self.advance()
        return _In(field, self.parse_list(), negated)

    def parse_list(self) -> tuple[int, ...]:
        if self.tok.kind != "LBRACK":
            raise self.unexpected("'['")
        opening = self.advance()
        if self.tok.kind == "RBRACK":
            raise _fail(f"empty list at character {opening.pos}; 'in' needs at least one value")
        values: list[int] = []
        while True:
            if self.tok.kind == "INT":
                self.list_values += 1
                if self.list_values > MAX_LIST_VALUES:
                    raise _fail(f"more than {MAX_LIST_VALUES} list values in total at character "
                                f"{self.tok.pos} (the limit is {MAX_LIST_VALUES})")
            values.append(self.parse_int())
            if self.tok.kind == "COMMA":
                self.advance()
                if self.tok.kind == "RBRACK":
                    break
            elif self.tok.kind == "RBRACK":
                break
            elif self.tok.kind == "END":
                raise _fail(f"'[' at character {opening.pos} is never closed")
            else:
                raise self.unexpected("',' or ']'")
        self.advance()
        return tuple(values)


def _chain(op: str, operands: list[_Node]) -> _Node:
    if len(operands) == 1:
        return operands[0]
    flat: list[_Node] = []
    for node in operands:
        if isinstance(node, _Chain) and node.op == op:
            flat.extend(node.operands)
        else:
            flat.append(node)
    return _Chain(op, tuple(flat))


def _render(node: _Node) -> str:
    if isinstance(node, _Cmp):
        return f"{node.field} {node.op} {node.value}"
    if isinstance(node, _In):
        keyword = "not in" if node.negated else "in"
        return f"{node.field} {keyword} [{', '.join(str(v) for v in node.values)}]"
    if isinstance(node, _Not):
        return f"not ({_render(node.operand)})"
    parts = []
    for operand in node.operands:
        text = _render(operand)
        # Only an 'or' chain inside an 'and' needs parentheses ('and' binds tighter).
        parts.append(f"({text})" if isinstance(operand, _Chain) and operand.op == "or" else text)
    return f" {node.op} ".join(parts)


def check_filter(expr: str, fields: Collection[str]) -> str:
    """Validate ``expr`` over the INT64 ``fields``; return its canonical form ("" means no filter).

    Raises :class:`RequestError` with a one-line message naming the problem and its position.
    """
    if not isinstance(expr, str):
        raise RequestError(f"filter must be a string (a boolean expression), got {type(expr).__name__}")
    if len(expr) > MAX_LENGTH:
        raise _fail(f"expression is {len(expr)} characters long; the limit is {MAX_LENGTH}")
    if not expr.strip():
        return ""
    return _render(_Parser(_tokenize(expr), frozenset(fields)).parse())
