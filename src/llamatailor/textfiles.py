"""Text files as users save them: UTF-8, with or without a byte-order mark (Windows editors add one).

Every text input (data files, the run file, chat templates) is read through here, so that the BOM rule
lives once. Other encodings are refused whole, with the encoding found, rather than read as mojibake or
rejected record by record: UTF-16 and UTF-32 are recognised by their BOM (or, without one, by the NUL bytes
of ASCII text), anything else by charset-normalizer's guess.
"""

import codecs
import re
from pathlib import Path

from charset_normalizer import from_bytes

from llamatailor.errors import EncodingError

UTF8_BOM = codecs.BOM_UTF8
# UTF-32 LE before UTF-16 LE: its BOM starts with UTF-16 LE's.
OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "UTF-32 BE"),
    (codecs.BOM_UTF16_LE, "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "UTF-16 BE"),
)
PROBE_BYTES = 1 << 16
UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
RESAVE = "save it as UTF-8 (with or without a byte-order mark) and run again"


def bom_length(path: Path) -> int:
    """Bytes to skip at the start of `path`: 3 for a UTF-8 BOM, else 0.

    For files read record by record. The first 64 KiB are checked: raises EncodingError naming the file and
    the encoding found when they are UTF-16/32, or hold bytes that are not UTF-8 and no multi-byte UTF-8
    character at all (the file is in a single-byte encoding such as Latin-1 or Windows-1252). Bad bytes in a
    file that is otherwise UTF-8 are left to the caller, which rejects only the record that holds them.
    """
    with path.open("rb") as handle:
        head = handle.read(PROBE_BYTES)
    if _has_utf8_multibyte(head):
        check_utf8(head, path, complete=True, only_boms=True)
    else:
        check_utf8(head, path, complete=len(head) < PROBE_BYTES)
    return len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0


def read_text(path: Path) -> str:
    """The whole file as text, without a UTF-8 BOM; EncodingError if it is not UTF-8."""
    data = path.read_bytes()
    check_utf8(data, path, complete=True)
    return data[len(UTF8_BOM) :].decode("utf-8") if data.startswith(UTF8_BOM) else data.decode("utf-8")


def check_utf8(data: bytes, path: Path, *, complete: bool, only_boms: bool = False) -> None:
    """Raise EncodingError unless `data` (the start of `path`, or all of it when `complete`) is UTF-8;
    with `only_boms`, only a UTF-16/32 byte-order mark or UTF-16 text counts."""
    for bom, name in OTHER_BOMS:
        if data.startswith(bom):
            raise EncodingError(f"{path}: the file is {name} (byte-order mark found); {RESAVE}")
    if b"\x00" in data[:4096] and _looks_utf16(data):
        raise EncodingError(f"{path}: the file looks like UTF-16 without a byte-order mark; {RESAVE}")
    if only_boms:
        return
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as exc:
        guess = from_bytes(data).best()
        found = f"its bytes look like {guess.encoding}" if guess is not None else "its encoding is unknown"
        raise EncodingError(
            f"{path}: not UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); {found}; {RESAVE}"
        ) from None


def _has_utf8_multibyte(data: bytes) -> bool:
    """Whether `data` holds at least one well-formed multi-byte UTF-8 character (a lead byte and its
    continuation bytes): evidence that the file is UTF-8 and its bad bytes are damage, not an encoding."""
    return UTF8_MULTIBYTE.search(data) is not None


def _looks_utf16(data: bytes) -> bool:
    """ASCII text in UTF-16 has a NUL in every other byte."""
    sample = data[:4096]
    return sample[1::2].count(0) > len(sample) // 4 or sample[0::2].count(0) > len(sample) // 4
