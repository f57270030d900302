"""Text cleaning: each step, and cleaning twice changes nothing more."""

from hypothesis import given
from hypothesis import strategies as st

from llamatailor.config import CleaningSection
from llamatailor.data.clean import clean_text

ALL_ON = CleaningSection()


def test_each_step_and_what_it_reports():
    assert clean_text("Cafe\u0301", ALL_ON) == ("Café", ["unicode_nfc"])
    assert clean_text("a\u0007b\ufeff", ALL_ON) == ("ab", ["control_chars"])
    assert clean_text(" a  \r\n  b\t\n", ALL_ON) == ("a\n  b", ["whitespace"])
    assert clean_text("def f():\n    return 1", ALL_ON) == ("def f():\n    return 1", [])  # indentation kept
    assert clean_text("tab\there", ALL_ON) == ("tab\there", [])
    off = CleaningSection(unicode_nfc=False, control_chars=False, whitespace=False)
    assert clean_text(" Cafe\u0301\u0007 ", off) == (" Cafe\u0301\u0007 ", [])


@given(st.text())
def test_cleaning_is_idempotent(text):
    once, _ = clean_text(text, ALL_ON)
    assert clean_text(once, ALL_ON) == (once, [])
