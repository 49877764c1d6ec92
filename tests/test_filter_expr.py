"""The recall filter grammar: junk Milvus Lite would ignore is rejected, valid filters canonicalised."""

import pytest

from paddlerec_milvus.errors import RequestError
from paddlerec_milvus.filter_expr import MAX_DEPTH, MAX_LENGTH, MAX_LIST_VALUES, check_filter

FIELDS = ("item_id", "category")

VALID = [
    ("item_id < 1000 and item_id > 500", "item_id < 1000 and item_id > 500"),
    ("category in [1, 2,3]", "category in [1, 2, 3]"),
    ("not (category == 3) || item_id >= 10", "not (category == 3) or item_id >= 10"),
    ("5 < item_id", "item_id > 5"),
    ("category not in [4]", "category not in [4]"),
    ("NOT item_id == 1", "not (item_id == 1)"),
    ("item_id==1&&category!=2", "item_id == 1 and category != 2"),
    ("5 <= item_id", "item_id >= 5"),
    ("5 > item_id", "item_id < 5"),
    ("5 >= item_id", "item_id <= 5"),
    ("-5 == item_id", "item_id == -5"),
    ("item_id != -0", "item_id != 0"),
    ("item_id == 007", "item_id == 7"),
    ("category In [1, 2,]", "category in [1, 2]"),
    ("category NOT IN [ -1 ,2 ]", "category not in [-1, 2]"),
    ("!item_id == 1", "not (item_id == 1)"),
    ("! ! item_id == 1", "not (not (item_id == 1))"),
    ("not ((item_id == 1))", "not (item_id == 1)"),
    ("((item_id < 3))", "item_id < 3"),
    ("\titem_id\n<\r\n3 ", "item_id < 3"),
    ("item_id == 1 AND category == 2 Or item_id == 3", "item_id == 1 and category == 2 or item_id == 3"),
    ("(item_id == 1 or item_id == 2) and category == 3", "(item_id == 1 or item_id == 2) and category == 3"),
    ("item_id == 1 or (item_id == 2 or item_id == 3)", "item_id == 1 or item_id == 2 or item_id == 3"),
    ("(item_id == 1 and category == 2) or item_id == 3", "item_id == 1 and category == 2 or item_id == 3"),
    ("not (item_id == 1 or item_id == 2)", "not (item_id == 1 or item_id == 2)"),
    ("item_id == 9223372036854775807", "item_id == 9223372036854775807"),
    ("item_id == -9223372036854775808", "item_id == -9223372036854775808"),
]

# (expression, a fragment the message must contain)
INVALID = [
    ("item_id < 1000 adn item_id > 500",
     "unexpected 'adn' at character 16; expected 'and', 'or' or the end"),
    ("item_id < 0; drop", "unexpected ';' at character 12"),
    ("item_id == 1;", "unexpected ';' at character 13"),
    ("item_id == '1'", "string literals are not supported (quote at character 12)"),
    ('category == "books"', "string literals are not supported (quote at character 13)"),
    ("array_contains(category, 1)", "function calls are not supported ('array_contains(' at character 1)"),
    ("item_id like 5", "unexpected 'like' at character 9; expected a comparison operator"),
    ("item_id == 1.5", "'1.5' at character 12 is not an integer"),
    ("item_id < 1e3", "'1e3' at character 11 is not an integer"),
    ("item_id < 0x10", "'0x10' at character 11 is not an integer"),
    ("categry == 1",
     "unknown field 'categry' at character 1; did you mean 'category'? (fields: category, item_id)"),
    ("Item_ID == 1", "unknown field 'Item_ID' at character 1; did you mean 'item_id'?"),
    ("zzz == 1", "unknown field 'zzz' at character 1 (fields: category, item_id)"),
    ("(item_id == 1", "'(' at character 1 is never closed"),
    ("item_id == 1)", "')' at character 13 has no matching '('"),
    ("(item_id == 1 category == 2)", "unexpected 'category' at character 15; expected 'and', 'or' or ')'"),
    ("item_id ==", "unexpected end at character 11; expected an integer"),
    ("item_id == 1 and", "unexpected end at character 17; expected a field name, 'not' or '('"),
    ("or item_id == 1", "unexpected 'or' at character 1; expected a field name, 'not' or '('"),
    ("not", "unexpected end at character 4; expected a field name, 'not' or '('"),
    ("item_id", "unexpected end at character 8; expected a comparison operator"),
    ("item_id = 1", "unexpected '=' at character 9; use '=='"),
    ("item_id == 1 & category == 2", "unexpected '&' at character 14; use '&&' or 'and'"),
    ("item_id == category", "unexpected 'category' at character 12; expected an integer"),
    ("1 == 2", "unexpected '2' at character 6; expected a field name"),
    ("1 < item_id < 5", "unexpected '<' at character 13; expected 'and', 'or' or the end"),
    ("item_id == - 1", "unexpected '-' at character 12"),
    ("item_id == 9223372036854775808",
     "integer 9223372036854775808 at character 12 is out of the INT64 range"),
    ("item_id > -9223372036854775809",
     "integer -9223372036854775809 at character 11 is out of the INT64 range"),
    ("item_id == " + "9" * 100, "is out of the INT64 range"),
    ("category in []", "empty list at character 13; 'in' needs at least one value"),
    ("category in [,]", "unexpected ',' at character 14; expected an integer"),
    ("category in [1 2]", "unexpected '2' at character 16; expected ',' or ']'"),
    ("category in [1, 2", "'[' at character 13 is never closed"),
    ("category in (1, 2)", "unexpected '(' at character 13; expected '['"),
    ("category not == 1", "unexpected '==' at character 14; expected 'in'"),
    ("category in [1] in [2]", "unexpected 'in' at character 17; expected 'and', 'or' or the end"),
    ("item_id == 1 -- comment", "unexpected '-' at character 14"),
    ("item_id == 1 \u00e9", "unexpected '\u00e9' at character 14"),
]


@pytest.mark.parametrize(("expr", "canonical"), VALID)
def test_valid_filters_are_canonicalised(expr, canonical):
    assert check_filter(expr, FIELDS) == canonical


@pytest.mark.parametrize(("expr", "canonical"), VALID)
def test_canonical_form_is_idempotent(expr, canonical):
    assert check_filter(check_filter(expr, FIELDS), FIELDS) == canonical


@pytest.mark.parametrize(("expr", "fragment"), INVALID)
def test_invalid_filters_are_rejected_with_the_problem_named(expr, fragment):
    with pytest.raises(RequestError) as err:
        check_filter(expr, FIELDS)
    message = str(err.value)
    assert message.startswith("filter: ")
    assert fragment in message
    assert "\n" not in message


def test_lite_trailing_junk_examples_name_the_offending_token():
    with pytest.raises(RequestError, match=r"unexpected 'adn' at character 16"):
        check_filter("item_id < 1000 adn item_id > 500", FIELDS)
    with pytest.raises(RequestError, match=r"unexpected ';' at character 12"):
        check_filter("item_id < 0; drop", FIELDS)


@pytest.mark.parametrize("expr", ["", "   ", "\n\t "])
def test_empty_filter_means_no_filter(expr):
    assert check_filter(expr, FIELDS) == ""


@pytest.mark.parametrize("expr", [None, 5, b"item_id == 1", ["item_id == 1"]])
def test_non_string_filter_is_rejected(expr):
    with pytest.raises(RequestError, match=r"^filter must be a string"):
        check_filter(expr, FIELDS)


def test_length_limit():
    expr = "item_id == 1" + " " * (MAX_LENGTH - 12)
    assert check_filter(expr, FIELDS) == "item_id == 1"
    with pytest.raises(RequestError, match=rf"{MAX_LENGTH + 1} characters long; the limit is {MAX_LENGTH}"):
        check_filter(expr + " ", FIELDS)


def test_list_size_limit_counts_all_lists():
    half = ", ".join(["1"] * (MAX_LIST_VALUES // 2))
    ok = f"category in [{half}] or item_id in [{half}]"
    assert check_filter(ok, FIELDS).count("1") == MAX_LIST_VALUES
    with pytest.raises(RequestError, match=rf"more than {MAX_LIST_VALUES} list values in total"):
        check_filter(ok + " or item_id in [2]", FIELDS)


@pytest.mark.parametrize("opening", ["(", "not ", "not (", "!"])
def test_depth_limit(opening):
    closing = ")" if "(" in opening else ""
    ok = opening * MAX_DEPTH + "item_id == 1" + closing * MAX_DEPTH
    canonical = check_filter(ok, FIELDS)
    assert check_filter(canonical, FIELDS) == canonical
    deep = opening * (MAX_DEPTH + 1) + "item_id == 1" + closing * (MAX_DEPTH + 1)
    with pytest.raises(RequestError, match=rf"nesting deeper than {MAX_DEPTH} levels"):
        check_filter(deep, FIELDS)


def test_deep_input_within_length_limit_does_not_hit_recursion():
    with pytest.raises(RequestError, match="nesting deeper"):
        check_filter("(" * 2000 + "item_id == 1" + ")" * 2000, FIELDS)
    with pytest.raises(RequestError, match="nesting deeper"):
        check_filter("!" * 4000 + "item_id == 1", FIELDS)


def test_fields_may_be_any_collection_and_no_fields_lists_none():
    assert check_filter("item_id == 1", {"item_id"}) == "item_id == 1"
    assert check_filter("item_id == 1", ["item_id"]) == "item_id == 1"
    with pytest.raises(RequestError, match=r"unknown field 'item_id' at character 1 \(fields: none\)"):
        check_filter("item_id == 1", [])


def test_keywords_are_not_field_names():
    with pytest.raises(RequestError, match="unexpected 'and' at character 1"):
        check_filter("and == 1", ["and", "item_id"])
