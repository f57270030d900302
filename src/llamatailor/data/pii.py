"""Detect personal data and secrets with patterns that are reliable enough to act on.

What it finds: e-mail addresses; phone numbers written with a leading + or with separators (9 to 15
digits); payment card numbers that pass the Luhn check; IPv4 and IPv6 addresses; IBANs that pass the
ISO 13616 mod-97 check; US social security numbers (ddd-dd-dddd, impossible ranges excluded) and UK
National Insurance numbers; secrets with well-known shapes (private key blocks, JSON web tokens, and AWS,
GitHub, OpenAI/Anthropic, Slack, Stripe, Google and Hugging Face keys).

What it does not find: names, postal addresses, dates of birth, free-form identifiers (customer
numbers, passport numbers, most national ids), phone numbers written as one unbroken run of digits,
card numbers split in unusual ways, secrets without a known prefix (random passwords, generic hex
tokens), and anything inside images or encoded text (base64). Version strings such as 1.2.3.4 are
reported as IP addresses. Treat `report` counts as a floor, not a guarantee.
"""

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda _: True


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def luhn_valid(number: str) -> bool:
    digits = [int(char) for char in number if char.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rotated = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rotated)) % 97 == 1


def ipv6_valid(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def phone_valid(candidate: str) -> bool:
    return 9 <= sum(char.isdigit() for char in candidate) <= 15


OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
SECRET_PATTERNS = (
    r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----",
    r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
    r"\bAIza[0-9A-Za-z_-]{35}",
    r"\bhf_[A-Za-z0-9]{30,}",
)

# Order matters: an earlier detector claims its span first (a card number is not also a phone number).
DETECTORS = (
    Detector("secret", re.compile("|".join(SECRET_PATTERNS))),
    Detector(
        "email",
        re.compile(
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
        ),
    ),
    Detector("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), iban_valid),
    Detector("card", re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), luhn_valid),
    Detector(
        "national_id",
        re.compile(
            r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"  # US SSN
            r"|\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"  # UK NINO
        ),
    ),
    Detector("ip", re.compile(rf"\b{OCTET}(?:\.{OCTET}){{3}}\b")),
    Detector(
        "ip",
        re.compile(
            r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4})(?![\w:])"
        ),
        ipv6_valid,
    ),
    Detector(
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)|(?<![\w+])\+\d{9,15}\b"
        ),
        phone_valid,
    ),
)
PLACEHOLDERS = {
    kind: f"[{kind.upper()}]" for kind in ("secret", "email", "iban", "card", "national_id", "ip", "phone")
}


def find_pii(text: str, kinds: set[str]) -> list[Finding]:
    """Non-overlapping findings of the wanted kinds, in text order."""
    taken: list[Finding] = []
    for detector in DETECTORS:
        if detector.kind not in kinds:
            continue
        for match in detector.pattern.finditer(text):
            start, end = match.span()
            overlaps = any(start < other.end and other.start < end for other in taken)
            if not overlaps and detector.valid(match.group()):
                taken.append(Finding(detector.kind, start, end))
    return sorted(taken, key=lambda finding: finding.start)


def mask_pii(text: str, findings: list[Finding]) -> str:
    pieces, position = [], 0
    for finding in findings:
        pieces += [text[position : finding.start], PLACEHOLDERS[finding.kind]]
        position = finding.end
    return "".join([*pieces, text[position:]])
