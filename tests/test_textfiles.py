"""The one rule for text files: UTF-8 with or without a BOM; other encodings refused by name."""

from pathlib import Path

import pytest

from llamatailor.errors import EncodingError
from llamatailor.textfiles import bom_length, read_text

TEXT = "instruction,output\nCafé crème,Grüße aus Köln\n"


def test_utf8_with_and_without_bom_read_the_same(tmp_path: Path) -> None:
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_bytes(TEXT.encode())
    marked.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    assert read_text(plain) == read_text(marked) == TEXT
    assert (bom_length(plain), bom_length(marked)) == (0, 3)


@pytest.mark.parametrize(
    ("encoding", "found"),
    [
        ("utf-16", "UTF-16 LE (byte-order mark found)"),
        ("utf-16-be", "UTF-16 without a byte-order mark"),
        ("utf-32", "UTF-32 LE (byte-order mark found)"),
        ("latin-1", "not UTF-8 (byte 22: b'\\xe9')"),
    ],
)
def test_other_encodings_are_refused_naming_file_and_encoding(
    tmp_path: Path, encoding: str, found: str
) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(TEXT.encode(encoding))
    for read in (read_text, bom_length):
        with pytest.raises(EncodingError) as caught:
            read(path)
        assert str(caught.value).startswith(f"{path}: ")
        assert found in str(caught.value)
        assert "save it as UTF-8" in str(caught.value)


def test_one_damaged_byte_in_utf8_text_is_left_to_the_record_reader(tmp_path: Path) -> None:
    """A UTF-8 file (it has multi-byte characters) with one bad byte costs one record, not the file; a file
    read whole (a run file, a template) has no records to lose and is refused."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        '{"a": "Grüße"}\n{"a": "\xff"}\n'.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff")
    )
    assert bom_length(path) == 0
    with pytest.raises(EncodingError, match=r"not UTF-8 \(byte 24"):
        read_text(path)
