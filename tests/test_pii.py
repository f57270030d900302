"""PII detectors: what they find, what they must not, the rules behind them, and precision on a labelled sample."""

import json
from collections import Counter
from pathlib import Path

import pytest

from llamatailor.data.pii import PLACEHOLDERS, card_valid, find_pii, iban_valid, luhn_valid, mask_pii
from llamatailor.textfiles import read_text

ALL = set(PLACEHOLDERS)
# Chat snippets written for this test, one JSON object a line: {"text", "pii": [[kind, exact substring]...]}.
# True PII (phones in several countries and formats, test card numbers, e-mails, IPs) and hard negatives
# (lists of years, prices, dates, times, order numbers, version strings, ISBNs, timestamps, coordinates, code).
SAMPLE = Path(__file__).parent / "data" / "pii_sample.jsonl"


def kinds_found(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start : f.end]) for f in find_pii(text, ALL)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+tag@mail.example.co.uk now", [("email", "jane.doe+tag@mail.example.co.uk")]),
        (
            "call +44 20 7946 0958 or (415) 555-2671",
            [("phone", "+44 20 7946 0958"), ("phone", "(415) 555-2671")],
        ),
        (
            "mobile +49 151 2345 6789, office 020 7946 0958",
            [("phone", "+49 151 2345 6789"), ("phone", "020 7946 0958")],
        ),
        ("call me on 4155552671", [("phone", "4155552671")]),  # an unbroken run counts after a phone word
        ("pay with 4111 1111 1111 1111", [("card", "4111 1111 1111 1111")]),
        ("or 5500-0000-0000-0004", [("card", "5500-0000-0000-0004")]),
        ("Amex 3782 822463 10005, exp 12/27", [("card", "3782 822463 10005")]),
        (
            "host 10.0.0.254 and 2001:db8::8a2e:370:7334",
            [("ip", "10.0.0.254"), ("ip", "2001:db8::8a2e:370:7334")],
        ),
        ("IBAN GB82 WEST 1234 5698 7654 32", [("iban", "GB82 WEST 1234 5698 7654 32")]),
        (
            "SSN 123-45-6789 and NINO AB 12 34 56 C",
            [("national_id", "123-45-6789"), ("national_id", "AB 12 34 56 C")],
        ),
        ("AWS AKIAIOSFODNN7EXAMPLE", [("secret", "AKIAIOSFODNN7EXAMPLE")]),
        ("token ghp_" + "A1b2" * 9, [("secret", "ghp_" + "A1b2" * 9)]),
        ("key sk-ant-api03-" + "x" * 30, [("secret", "sk-ant-api03-" + "x" * 30)]),
        ("hf_" + "abcdEFGH" * 4, [("secret", "hf_" + "abcdEFGH" * 4)]),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
            [("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----")],
        ),
    ],
)
def test_finds(text, expected):
    assert kinds_found(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "on 2026-11-23 at 12:30:45",  # a date and a time
        "pi is 3.14159 and e is 2.71828",
        "order 12345678 shipped",  # 8 unbroken digits
        "order 4155552671 shipped",  # a valid US number's digits, but no phone word and no grouping
        "INV-2024-000123 is paid",  # 202-400-0123 is a valid US number, not grouped as one
        "(555) 123-4567 and 123-456-7890",  # no such US area codes
        "between 1999 2000 2001 2002 and 2019, 2020, 2021",
        "ISBN 978-0-306-40615-7 and 9780306406157",
        "sent at 1732924800123 ms",
        "card 4111 1111 1111 1112 fails Luhn",
        "serial 1234 5678 9012 3452",  # Luhn-valid digits, but no issuer starts with 1
        "hex 4111 1111 1111 1111 1111 1111",  # a card's digits inside a longer run
        "version 1.2.3.4, pkg==2.0.0.1, v1.2.3.4, 1.2.3.4.5",
        "netmask 255.255.255.0 on 127.0.0.1, bind 0.0.0.0",
        "SSN 000-12-345",
        "user@localhost has no domain",
        "see icon@2x.png",
        "the sk- prefix alone sk-short",
    ],
)
def test_does_not_find(text):
    assert kinds_found(text) == []


def test_years_are_not_masked():
    text = "the years 1999 2000 2001"
    assert mask_pii(text, find_pii(text, ALL)) == text


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert not luhn_valid("0000000000000000")  # one repeated digit is never a card
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE89 3704 0044 0532 0130 01")
    assert "iban" not in {kind for kind, _ in kinds_found("IBAN GB83 WEST 1234 5698 7654 32 fails mod 97")}


def test_card_needs_a_known_issuer_at_its_length():
    assert card_valid("378282246310005")  # American Express: 34/37, 15 digits
    assert not card_valid("3782822463100052")  # Luhn-valid, but American Express has no 16-digit cards
    assert card_valid("2223003122003222")  # Mastercard 2-series: 2221-2720
    assert not card_valid("2123003122003223")  # Luhn-valid, but 2123 is no issuer's
    assert not card_valid("9780301000046")  # an ISBN-13 that passes Luhn: no issuer starts with 9
    assert card_valid("4222222222222")  # Visa's 13-digit length


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("4111 1111-1111 1111", False),  # mixed separators
        ("41111 11111 11111 1", False),  # not grouped as cards are printed
        ("4111111111111111", True),
        ("3056 930902 5904", True),  # Diners 4-6-4
        ("on file: 4242-4242-4242-4242.", True),
    ],
)
def test_card_grouping(text, found):
    assert [kind for kind, _ in kinds_found(text)] == (["card"] if found else [])


def test_mask_replaces_each_finding_and_only_the_chosen_kinds():
    text = "ann@example.org, 4111 1111 1111 1111, 10.1.2.3, +44 20 7946 0958"
    assert mask_pii(text, find_pii(text, ALL)) == "[EMAIL], [CARD], [IP], [PHONE]"
    assert mask_pii(text, find_pii(text, {"card"})) == "ann@example.org, [CARD], 10.1.2.3, +44 20 7946 0958"


def sample() -> list[dict]:
    return [json.loads(line) for line in read_text(SAMPLE).splitlines()]


def test_sample_precision_and_recall():
    rows = sample()
    assert len(rows) >= 100 and sum(not row["pii"] for row in rows) >= 60
    hits, found, wanted, misses = Counter(), Counter(), Counter(), []
    for row in rows:
        got = Counter(kinds_found(row["text"]))
        want = Counter(tuple(label) for label in row["pii"])
        for counter, items in ((hits, got & want), (found, got), (wanted, want)):
            counter.update(kind for kind, _ in items.elements())
        misses += [(row["text"], "false", item) for item in (got - want)]
        misses += [(row["text"], "missed", item) for item in (want - got)]
    precision = {kind: hits[kind] / found[kind] for kind in found}
    recall = {kind: hits[kind] / wanted[kind] for kind in wanted}
    floors = {"phone": (0.95, 0.9), "card": (0.95, 1.0), "email": (1.0, 1.0), "ip": (0.7, 1.0)}
    for kind, (least_precision, least_recall) in floors.items():
        assert precision[kind] >= least_precision and recall[kind] >= least_recall, (kind, misses)
    # What this sample measures today (the misses are named in docs/data.md, PII): national-format numbers
    # outside the US and UK plans, and dotted quads after "version numbers".
    assert sorted(misses) == [
        ("In Delhi call 98765 43210 after lunch", "missed", ("phone", "98765 43210")),
        (
            "My Sydney mobile is 0412 345 678 and the office (02) 9374 4000",
            "missed",
            ("phone", "(02) 9374 4000"),
        ),
        (
            "My Sydney mobile is 0412 345 678 and the office (02) 9374 4000",
            "missed",
            ("phone", "0412 345 678"),
        ),
        ("version numbers 4.1.1.1 and 5.5.5.5 of the driver", "false", ("ip", "4.1.1.1")),
        ("version numbers 4.1.1.1 and 5.5.5.5 of the driver", "false", ("ip", "5.5.5.5")),
    ]


@pytest.mark.parametrize(
    "filler",
    [
        "Paid $19.99 at 10:30 on 2026-11-23 (ref 2024-000123), build 3.11.2. "
        * 3,  # one window with the text
        "Paid on 2026-11-23, " + "then nothing of note happened for a while, " * 3,  # windows apart
    ],
)
def test_findings_do_not_depend_on_the_surrounding_text(filler):
    """Phone numbers are matched only in windows around runs of digits: a text's findings, put between other
    text and numbers, are the same spans shifted."""
    for row in sample():
        alone = find_pii(row["text"], ALL)
        inside = find_pii(filler + row["text"] + " " + filler, ALL)
        assert [(f.kind, f.start - len(filler), f.end - len(filler)) for f in inside] == [
            (f.kind, f.start, f.end) for f in alone
        ], row["text"]


def test_phone_regions_decide_which_national_formats_count():
    """Without +, a number counts in the plans of `phone_regions` only; with +, in its own country's plan."""
    text = "Office (02) 9374 4000, Delhi 98765 43210, London 020 7946 0958, Berlin +49 151 2345 6789."

    def phones(regions):
        return [text[f.start : f.end] for f in find_pii(text, {"phone"}, regions)]

    assert phones(("US", "GB")) == ["020 7946 0958", "+49 151 2345 6789"]
    assert phones(("AU",)) == ["(02) 9374 4000", "+49 151 2345 6789"]
    # London's 020 7946 0958 is also a valid Indian landline (Pune, 020): each plan is read on its own.
    assert phones(("IN",)) == ["98765 43210", "020 7946 0958", "+49 151 2345 6789"]
    assert phones(()) == ["+49 151 2345 6789"]
    assert find_pii("the years 1999 2000 2001", ALL, ("AU", "IN", "DE")) == []
