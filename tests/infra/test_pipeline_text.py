"""Pipeline grammar: parsing, printing, round-trip, errors with columns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.errors import PipelineSyntaxError
from graphopt.infra.pipeline_text import (
    PipelineItem,
    format_pipeline,
    parse_pipeline,
)


def test_parses_the_documented_example() -> None:
    items = parse_pipeline("fuse,ptq(bits=8,calib=entropy),prune(heads=0.25)")
    assert [i.name for i in items] == ["fuse", "ptq", "prune"]
    assert items[1].options == {"bits": "8", "calib": "entropy"}
    assert items[2].options == {"heads": "0.25"}
    assert items[1].column == 6


def test_whitespace_quotes_lists_and_nesting() -> None:
    items = parse_pipeline(' fixpoint( cleanup , fuse , max_iter=3 ) , wq(exclude=["a b", c])')
    assert items[0].name == "fixpoint"
    assert [c.name for c in items[0].children] == ["cleanup", "fuse"]
    assert items[0].options == {"max_iter": "3"}
    assert items[1].options == {"exclude": ["a b", "c"]}


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("", 1),
        ("fuse,", 6),
        ("fuse(bits=8", 12),
        ("fuse(bits=)", 11),
        ("fuse)", 5),
        ("ptq(bits=8,bits=4)", 12),
        ("a(b='x)", 5),
    ],
)
def test_syntax_errors_name_the_column(text: str, column: int) -> None:
    with pytest.raises(PipelineSyntaxError) as info:
        parse_pipeline(text)
    assert info.value.column == column
    assert "\n" not in str(info.value)


_names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_values = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.:+/-]{1,8}", fullmatch=True),
    st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=8),
)
_items = st.builds(
    PipelineItem,
    name=_names,
    options=st.dictionaries(
        st.from_regex(r"[a-z_]{1,6}", fullmatch=True),
        st.one_of(_values, st.lists(_values, max_size=3)),
        max_size=3,
    ),
)


def _strip(items: list[PipelineItem]) -> list[tuple[str, dict[str, object]]]:
    return [(i.name, i.options) for i in items]


@given(st.lists(_items, min_size=1, max_size=4))
def test_format_then_parse_round_trips(items: list[PipelineItem]) -> None:
    text = format_pipeline(items)
    assert _strip(parse_pipeline(text)) == _strip(items)
    assert format_pipeline(parse_pipeline(text)) == text
