"""sync.jsonio: the fast JSON path answers exactly as the standard library does, also where orjson is stricter."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync import jsonio

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(JSON_VALUES)
def test_loads_reads_what_json_writes(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        # repr: an integer read as a float would still compare equal
        assert repr(jsonio.loads(text.encode("utf-8"))) == repr(json.loads(text))


@given(JSON_VALUES)
def test_dumps_round_trips_and_is_never_longer_than_json(value: Any) -> None:
    wire = jsonio.dumps(value)
    assert wire is not None and json.loads(wire.decode("utf-8")) == value
    assert len(wire) <= len(json.dumps(value))


@pytest.mark.parametrize("text", [b'{"t": "\\ud800"}', b'{"n": NaN}', b'{"i": 123456789012345678901234567890}',
                                  '{"t": "é"}'.encode("utf-16")])
def test_loads_accepts_what_json_accepts_and_orjson_refuses(text: bytes) -> None:
    got, want = jsonio.loads(text), json.loads(text)
    assert repr(got) == repr(want)  # repr: NaN != NaN


def test_loads_refuses_what_is_not_json_with_a_value_error() -> None:
    with pytest.raises(ValueError):
        jsonio.loads(b"<html>not json</html>")


def test_dumps_answers_none_for_what_json_has_no_form_for() -> None:
    assert jsonio.dumps({1j: "x"}) is None
    assert jsonio.dumps({"big": 2**80}) == b'{"big":1208925819614629174706176}'
    assert math.isnan(json.loads(jsonio.dumps({"n": [1.5]}) or b"")["n"][0] * math.nan)
