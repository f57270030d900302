"""Property-based tests: random records never crash the parsers; valid ones survive a round trip."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llamatailor.config import DataFile
from llamatailor.data.formats import FORMATS, RecordError, detect_format, to_sample
from llamatailor.data.reader import read_source
from llamatailor.errors import EncodingError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "instruction",
        "input",
        "output",
        "messages",
        "conversations",
        "prompt",
        "completion",
        "chosen",
        "rejected",
        "system",
        "role",
        "content",
        "from",
        "value",
    ]
)
records = st.dictionaries(keys, json_values, max_size=5) | json_values
roles = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", None, 3])
turn_lists = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.text(max_size=10) | st.integers()}), max_size=5
)


@settings(max_examples=300)
@given(record=records | st.fixed_dictionaries({"messages": turn_lists}))
def test_any_record_either_parses_or_raises_a_record_error(record):
    fmt = detect_format(record)
    for candidate in [fmt] if fmt else FORMATS:
        try:
            sample = to_sample(record, candidate)
        except RecordError as error:
            assert error.reason
            continue
        assert sample.kind in ("sft", "preference")
        assert all(isinstance(m["content"], str) for m in sample.messages)


@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.text(max_size=30)), min_size=1, max_size=4))
def test_valid_conversations_round_trip_through_openai_records(turns):
    messages = [
        m
        for user, answer in turns
        for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
    ]
    record = {"messages": messages}
    assert detect_format(record).name == "openai"
    assert to_sample(json.loads(json.dumps(record)), detect_format(record)).messages == messages


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_reader_survives_arbitrary_bytes(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("bytes") / "d.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        records = list(read_source(DataFile(path=path), 1000))
    except EncodingError:
        return  # a file whose start is not UTF-8 is refused whole, by design (llamatailor.textfiles)
    for record in records:
        assert record.error is None or record.value is None
        assert record.where.startswith(f"{path}:")
