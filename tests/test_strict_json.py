"""The strict JSON reader refuses what lenient parsers let through (RFC 8259 §4, §6, §8.1)."""

from __future__ import annotations

import pytest

from dpop_hsm.strict_json import StrictJsonError, loads_strict


def test_plain_objects_parse() -> None:
    assert loads_strict(b'{"a":1,"b":[true,null,"x"],"c":1.5}') == {
        "a": 1,
        "b": [True, None, "x"],
        "c": 1.5,
    }
    assert loads_strict('{"k":"v"}') == {"k": "v"}


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (b'{"token_type":"Bearer","token_type":"DPoP"}', "duplicate"),
        (b'{"a":{"x":1,"x":2}}', "duplicate"),
        (b'{"exp":NaN}', "NaN"),
        (b'{"exp":Infinity}', "Infinity"),
        (b'{"exp":-Infinity}', "Infinity"),
        (b'{"exp":1e400}', "finite"),
        (b'\xef\xbb\xbf{"a":1}', "byte-order mark"),
        ('\ufeff{"a":1}', "byte-order mark"),
        ('{"a":"b"}'.encode("utf-16"), "UTF-8"),
        ('{"a":"b"}'.encode("utf-16-le"), "not valid JSON"),  # NULs are valid UTF-8
        ('{"a":"b"}'.encode("utf-32"), "UTF-8"),
        (b'{"a":"\xff"}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "deep"),
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_refused_inputs_name_the_rule(data: bytes | str, rule: str) -> None:
    with pytest.raises(StrictJsonError, match=rule) as info:
        loads_strict(data)
    assert isinstance(info.value, ValueError)
    # The message never repeats the input (it may hold secrets).
    assert "token_type" not in str(info.value)
