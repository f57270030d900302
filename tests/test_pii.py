"""PII detectors: what they find, what they must not, and the checksums behind them."""

import pytest

from llamatailor.data.pii import PLACEHOLDERS, find_pii, iban_valid, luhn_valid, mask_pii

ALL = set(PLACEHOLDERS)


def kinds_found(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start : f.end]) for f in find_pii(text, ALL)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+tag@mail.example.co.uk now", [("email", "jane.doe+tag@mail.example.co.uk")]),
        (
            "call +44 20 7946 0958 or (555) 123-4567",
            [("phone", "+44 20 7946 0958"), ("phone", "(555) 123-4567")],
        ),
        ("pay with 4111 1111 1111 1111", [("card", "4111 1111 1111 1111")]),
        ("or 5500-0000-0000-0004", [("card", "5500-0000-0000-0004")]),
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
        "card 4111 1111 1111 1112 fails Luhn",
        "SSN 000-12-345",
        "user@localhost has no domain",
        "the sk- prefix alone sk-short",
    ],
)
def test_does_not_find(text):
    assert kinds_found(text) == []


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert not luhn_valid("0000000000000000")  # one repeated digit is never a card
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE89 3704 0044 0532 0130 01")
    assert "iban" not in {kind for kind, _ in kinds_found("IBAN GB83 WEST 1234 5698 7654 32 fails mod 97")}


def test_mask_replaces_each_finding_and_only_the_chosen_kinds():
    text = "ann@example.org, 4111 1111 1111 1111, 10.1.2.3"
    assert mask_pii(text, find_pii(text, ALL)) == "[EMAIL], [CARD], [IP]"
    assert mask_pii(text, find_pii(text, {"card"})) == "ann@example.org, [CARD], 10.1.2.3"
