"""Text files as users save them: UTF-8, with or without a byte-order mark (Windows editors add one).

Every text input (data files, the run file, chat templates) is read through here, so that the encoding rule
lives once. A file's first 64 KiB must decode as UTF-8 (a character cut by that boundary aside), or the
whole file is refused, naming the line and byte of the first bad byte and the encoding it looks like:
UTF-16 and UTF-32 are recognised by their BOM (or, without one, by the NUL bytes of ASCII text), anything
else by charset-normalizer's guess. A well-formed multi-byte UTF-8 sequence proves nothing (Windows-1252's
`ß“` is the bytes DF 93, a valid UTF-8 pair), so the probe is decoded, not searched for UTF-8-looking bytes.
Only bytes past the first 64 KiB are left to record readers, which reject just the record holding them.
"""

import codecs
from pathlib import Path

from charset_normalizer import from_bytes
from charset_normalizer.utils import is_multi_byte_encoding

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
RESAVE = "save it as UTF-8 (with or without a byte-order mark) and run again"
# Bytes 0x80-0x9F: punctuation in Windows-1252 („ “ ” – € …), invisible C1 controls in Latin-1 (ISO-8859-1).
C1_BYTES = bytes(range(0x80, 0xA0))


def bom_length(path: Path) -> int:
    """Bytes to skip at the start of `path`: 3 for a UTF-8 BOM, else 0.

    For files read record by record. Raises EncodingError naming the file, the line and byte of the first
    bad byte and the encoding found when the first PROBE_BYTES (64 KiB) are not UTF-8 (a multi-byte
    character cut at that boundary aside). Bad bytes past them are left to the caller, which rejects only
    the record that holds them.
    """
    with path.open("rb") as handle:
        head = handle.read(PROBE_BYTES)
    check_utf8(head, path, complete=len(head) < PROBE_BYTES)
    return len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0


def read_text(path: Path) -> str:
    """The whole file as text, without a UTF-8 BOM; EncodingError if any of it is not UTF-8."""
    data = path.read_bytes()
    check_utf8(data, path, complete=True)
    return data[len(UTF8_BOM) :].decode("utf-8") if data.startswith(UTF8_BOM) else data.decode("utf-8")


def check_utf8(data: bytes, path: Path, *, complete: bool) -> None:
    """Raise EncodingError unless `data` (the start of `path`, or all of it when `complete`) is UTF-8.

    The message names `path`, the line (1-based) and byte (0-based within that line, as record readers
    count it) of the first bad byte, and the encoding the bytes look like. Without `complete`, a
    multi-byte character cut short at the end of `data` is allowed: the rest of it lies beyond.
    """
    for bom, name in OTHER_BOMS:
        if data.startswith(bom):
            raise EncodingError(f"{path}: the file is {name} (byte-order mark found); {RESAVE}")
    if b"\x00" in data[:4096] and _looks_utf16(data):
        raise EncodingError(f"{path}: the file looks like UTF-16 without a byte-order mark; {RESAVE}")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1]
        raise EncodingError(
            f"{path}: not UTF-8 (byte {exc.start - line_start}: {bad!r}) on line {line}; "
            f"{encoding_guess(data)}; {RESAVE}"
        ) from None


def encoding_guess(data: bytes) -> str:
    """What the bytes look like, worded for a message: "its bytes look like Windows-1252 (cp1252)".

    charset-normalizer ranks the encodings that decode `data` by how messy, then how coherent the text
    reads, and on a tie by name: for Western European text cp1250 (Central European) comes first, though
    Windows-1252 reads the same letters (German `ß`, `ö`, `„“`: its `could_be_from_charset`) or reads as
    well (Spanish `ñ`, `¿`). So Windows-1252 is named when it decodes `data` as the best guess does, or
    ties with it on both scores: it is by far the most common of them (Windows' default for Western
    European languages). Latin-1 reads the same where no byte falls in 0x80-0x9F, and is then named beside
    it. Other single-byte guesses are unreliable on short Latin-script text (hp_roman8 for French in
    Windows-1252), so they are given as a guess beside that advice; multi-byte ones (cp932) as they are.
    """
    matches = list(from_bytes(data))
    if not matches:
        return "its encoding is unknown"
    best = matches[0]
    western = any(
        "cp1252" in match.could_be_from_charset
        and (match is best or (match.chaos, match.coherence) == (best.chaos, best.coherence))
        for match in matches
    )
    if western and len(data.translate(None, C1_BYTES)) < len(data):
        return "its bytes look like Windows-1252 (cp1252)"
    if western:
        return "its bytes look like Windows-1252 (cp1252) or Latin-1 (ISO-8859-1), which read them the same"
    if is_multi_byte_encoding(best.encoding):
        return f"its bytes look like {best.encoding}"
    return (
        f"its bytes look like a single-byte encoding (charset-normalizer's best guess: {best.encoding}; "
        "Western European text is most often Windows-1252)"
    )


def _looks_utf16(data: bytes) -> bool:
    """ASCII text in UTF-16 has a NUL in every other byte."""
    sample = data[:4096]
    return sample[1::2].count(0) > len(sample) // 4 or sample[0::2].count(0) > len(sample) // 4
