"""The bus's record encoding and framing, made cheaper, say what they said before.

``encode_records`` (orjson where it says what the stdlib encoder says) gives the same keys and values
that read back as the same JSON as the stdlib encoder it replaced (kept below), or the same errors;
``_frames`` writes the very bytes of ``_frame`` record by record; a published batch reads back as the
records themselves."""
import datetime
import enum
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from online.bus import MAX_RECORD, encode_records, open_bus
from online.bus.base import _BODY, _bad
from online.bus.segments import _frame, _frames, _parse
from strategy import ValidationError
from strategy.errors import FieldError

PROPS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_encode_records(records):
    """``encode_records`` as it was before (commit 9d95a60), verbatim."""
    if not isinstance(records, (list, tuple)):
        raise _bad("records", f"expected a list of objects, got {type(records).__name__}", "type")
    out, errs = [], []
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            errs.append(FieldError(f"records[{i}]", f"expected an object, got {type(rec).__name__}", "type"))
            continue
        try:
            value = dumps(rec).encode()
        except (TypeError, ValueError) as exc:
            errs.append(FieldError(f"records[{i}]", f"not JSON-serialisable: {exc}", "type"))
            continue
        uid = rec.get("user_id")
        if uid is None:   # an item write has no user: its id keys it, so one item's writes keep their order
            uid = rec.get("item_id")
        key = b"" if uid is None else str(uid).encode()
        if len(key) > 0xFFFF or len(value) + len(key) + _BODY.size > MAX_RECORD:
            errs.append(FieldError(f"records[{i}]", f"record larger than {MAX_RECORD} bytes", "too_long"))
            continue
        out.append((key, value))
    if errs:
        raise ValidationError(errs)
    return out


def canonical(value):
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return (type(value).__name__, value)


def outcome(fn, records):
    try:
        return "ok", [(key, canonical(json.loads(value))) for key, value in fn(records)]
    except ValidationError as exc:
        return "error", [(e.path, e.message, e.code) for e in exc.errors]


class Color(enum.Enum):
    red = "r"


class Level(enum.IntEnum):
    high = 3


class Name(str, enum.Enum):
    a = "a"


class Sub(str):
    pass


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.integers(), st.floats(),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e-05, 1e16, -0.0, 5e-324, 1.7e308]),
    st.text(), st.sampled_from(["null", "\ud800", "é\u2028", "\x00\x7f", "a\"b\\c"]),
    st.sampled_from([Color.red, Level.high, Name.a, Sub("s"), np.float64(0.5), np.int64(3),
                     datetime.date(2020, 1, 2), b"raw", object]),
)
KEYS = st.one_of(st.sampled_from(["user_id", "item_id", "ts", "x"]), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple), st.dictionaries(KEYS, inner, max_size=4),
    st.dictionaries(st.one_of(st.integers(0, 3), st.none(), st.floats(0, 1), KEYS), inner, max_size=3)),
    max_leaves=20)
PLAIN = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 63 - 1),
                               st.floats(allow_nan=False, allow_infinity=False), st.text()),
                     lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
                     max_leaves=20)
RECORD = st.dictionaries(KEYS, VALUES, max_size=6)
PLAIN_RECORD = st.dictionaries(KEYS, PLAIN, max_size=6)


@PROPS
@given(st.lists(st.one_of(RECORD, PLAIN_RECORD, PLAIN_RECORD, VALUES), max_size=6))
def test_encode_records_reads_back_as_the_stdlib_encoding(records):
    assert outcome(encode_records, records) == outcome(reference_encode_records, records)


@PROPS
@given(st.lists(PLAIN_RECORD, min_size=1, max_size=6))
def test_plain_records_take_the_orjson_path(records):
    got = encode_records(records)
    assert [k for k, _ in got] == [k for k, _ in reference_encode_records(records)]
    assert [canonical(json.loads(v)) for _, v in got] == [canonical(r) for r in records]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 2 ** 64, Color.red, np.float64(1.0), "\udfff",
                                 {1: 2}, {None: 1}, (1, 2), [math.nan], {"x": [1, {"y": math.inf}]}])
def test_what_orjson_would_write_otherwise_is_the_stdlib_encoding(bad):
    records = [{"user_id": "u", "v": 1.5}, {"user_id": "u", "bad": bad}]
    assert outcome(encode_records, records) == outcome(reference_encode_records, records)


def test_too_large_and_unkeyable_records_are_named_as_before():
    records = [{"user_id": "u", "v": "x" * MAX_RECORD}, {"user_id": "u" * 70_000}, {"item_id": 7}, {"a": 1}]
    assert outcome(encode_records, records) == outcome(reference_encode_records, records)
    assert outcome(encode_records, records)[0] == "error"
    for bad in (3, "x", None, {"a"}):
        with pytest.raises(ValidationError) as a:
            encode_records(bad)
        with pytest.raises(ValidationError) as b:
            reference_encode_records(bad)
        assert a.value.errors == b.value.errors


@PROPS
@given(st.floats(allow_nan=False), st.lists(st.tuples(st.sampled_from([b"", b"u1", b"u2", "é".encode()]) | st.binary(),
                                                      st.binary()), max_size=8))
def test_frames_are_the_bytes_of_frame(ts, encoded):
    data = _frames(ts, encoded)
    assert data == b"".join(_frame(ts, k, v) for k, v in encoded)
    frames, _, why = _parse(data, 0, len(data))
    assert why == "end" and [(f[3], f[4]) for f in frames] == encoded


def test_a_published_batch_reads_back_as_the_records(tmp_path):
    records = [{"user_id": "u1", "ts": 1.5, "score": 1e-05, "big": 1e16, "neg": -0.0, "text": "é\u2028",
                "features": {"recent": ["a", "b"], "n": None}, "predictions": {"click": 0.1}},
               {"item_id": "i9", "n": 2 ** 63 - 1}, {"user_id": "u2", "x": 2 ** 70}]
    with open_bus(f"embedded://{tmp_path / 'bus'}", fsync="never") as bus:
        bus.publish("impressions", records)
        with bus.consumer("c", ["impressions"]) as consumer:
            got = consumer.poll(10, timeout_s=1.0)
    assert [r.value for r in got] == records
    assert [r.key for r in got] == ["u1", "i9", "u2"]
    assert canonical(got[0].value) == canonical(records[0])
