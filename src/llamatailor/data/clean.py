"""Text cleaning: Unicode NFC, control characters, whitespace. Indentation inside text is kept (code).

`clean_text` returns the cleaned text and which steps changed it, so the report can count them.
"""

import re
import unicodedata

from llamatailor.config import CleaningSection

# C0 and C1 controls except tab and newline (carriage returns are handled as line ends), DEL, the BOM,
# and zero-width spaces. Zero-width (non-)joiners stay: some scripts and emoji need them.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def clean_text(text: str, clean: CleaningSection) -> tuple[str, list[str]]:
    """Controls first (removing one can join what NFC composes), then NFC, then whitespace: idempotent."""
    steps = (
        ("control_chars", clean.control_chars, lambda t: CONTROL_CHARS.sub("", t)),
        ("unicode_nfc", clean.unicode_nfc, lambda t: unicodedata.normalize("NFC", t)),
        ("whitespace", clean.whitespace, _tidy_whitespace),
    )
    changed = []
    for name, enabled, step in steps:
        if enabled and (after := step(text)) != text:
            changed.append(name)
            text = after
    return text, changed


def _tidy_whitespace(text: str) -> str:
    return TRAILING_SPACE.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
