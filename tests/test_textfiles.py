"""The one rule for text files: UTF-8 with or without a BOM; other encodings refused by name."""

from pathlib import Path

import pytest

from llamatailor.errors import EncodingError
from llamatailor.textfiles import PROBE_BYTES, bom_length, encoding_guess, read_text

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
        (
            "latin-1",
            "not UTF-8 (byte 3: b'\\xe9') on line 2; its bytes look like Windows-1252 (cp1252) or Latin-1 "
            "(ISO-8859-1), which read them the same",
        ),
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


# Windows-1252 German: `„` is 0x84 (never valid in UTF-8), `ß“` the bytes DF 93 (a well-formed UTF-8 pair).
GERMAN = '{"instruction": "Wie „groß“ ist es?", "output": "Sehr groß."}\n'


@pytest.mark.parametrize("every", [1, 2], ids=["every-line", "every-other-line"])
def test_windows_1252_is_refused_whole_though_some_bytes_pair_up_as_utf8(tmp_path: Path, every: int) -> None:
    """The first 64 KiB must decode: `ß“` looking like UTF-8 does not make the file UTF-8."""
    ascii_line = '{"instruction": "Hello", "output": "World"}\n'
    lines = [GERMAN if n % every == 0 else ascii_line for n in range(40)]
    path = tmp_path / "de.jsonl"
    path.write_bytes("".join(lines).encode("cp1252"))
    assert b"\xdf\x93" in path.read_bytes()
    with pytest.raises(EncodingError) as caught:
        bom_length(path)
    assert str(caught.value) == (
        f"{path}: not UTF-8 (byte 21: b'\\x84') on line 1; its bytes look like Windows-1252 (cp1252); "
        "save it as UTF-8 (with or without a byte-order mark) and run again"
    )


def test_only_bytes_past_the_first_64_kib_are_left_to_the_record_reader(tmp_path: Path) -> None:
    """A character cut by the probe's end is no bad byte; a bad byte past the probe costs one record, not
    the file; a file read whole (a run file, a template) has no records to lose and is refused."""
    path = tmp_path / "data.jsonl"
    start = b'{"a": "' + b"x" * (PROBE_BYTES - 8)
    path.write_bytes(start + 'é"}\n'.encode())  # é is C3 A9: C3 is the probe's last byte
    assert path.read_bytes()[PROBE_BYTES - 1 : PROBE_BYTES + 1] == "é".encode()
    assert bom_length(path) == 0
    path.write_bytes(start + b'x"}\n' + '{"a": "Grüße"}\n'.encode() + b'{"a": "caf\xe9"}\n')
    assert bom_length(path) == 0
    with pytest.raises(EncodingError) as caught:
        read_text(path)
    assert str(caught.value).startswith(f"{path}: not UTF-8 (byte 10: b'\\xe9') on line 3; ")


@pytest.mark.parametrize(
    ("text", "encoding", "found"),
    [
        (
            "Zażółć gęślą jaźń, czy to działa? Tak.",
            "cp1250",
            "a single-byte encoding (charset-normalizer's "
            "best guess: cp1250; Western European text is most often Windows-1252)",
        ),
        (
            "Señor, ¿dónde está la estación? Mañana.",
            "cp1252",
            "Windows-1252 (cp1252) or Latin-1 (ISO-8859-1)",
        ),
        ("日本語のテキストです。これはテスト。", "shift_jis", "cp932"),
    ],
    ids=["polish-cp1250", "spanish-cp1252", "japanese-shift-jis"],
)
def test_encoding_guess_names_windows_1252_only_where_it_reads_the_bytes_as_well(
    text: str, encoding: str, found: str
) -> None:
    """charset-normalizer alone names cp1250 for Spanish (a tie it breaks by name)."""
    assert encoding_guess(text.encode(encoding)).startswith(f"its bytes look like {found}")
