"""Detect personal data and secrets, validating each candidate so that a finding is reliable enough to act on.

A loose digit pattern flags years, prices, order numbers and version strings; every detector here checks
what the kind's own rules say before it reports. What each one validates (docs/data.md, PII, says the same):

- phone: Google's libphonenumber (the `phonenumbers` port): the number must be valid in its country's
  numbering plan, not merely have a plausible length. With a leading + any country is accepted; without one,
  only the plans of `phone_regions` (default the US/NANP and UK), and the digits must be grouped as that
  country writes them.
  An unbroken run of digits without + is a phone number only after a phone word (`call`, `tel`, `mobile`...),
  since bare runs are usually ids.
- card: 13-19 digits, unbroken or grouped as cards are printed (4-4-4-4 with a shorter last group, 4-6-5,
  4-6-4; one separator throughout), with a known issuer prefix (IIN) at a length that issuer uses, passing
  the Luhn check.
- email: `local@domain.tld`, where the "tld" is not an image file extension (`icon@2x.png`).
- ip: IPv4 dotted quads not inside a longer dotted run, not loopback, unspecified or reserved (netmasks), and
  not after a version word (`version 1.2.3.4`) or a package pin (`==1.2.3.4`); IPv6 addresses that parse.
- iban: country code, check digits and account, passing the ISO 13616 mod-97 check.
- national_id: US social security numbers (ddd-dd-dddd, impossible ranges excluded), UK National Insurance
  numbers.
- secret: private key blocks, JSON web tokens, and AWS, GitHub, OpenAI/Anthropic, Slack, Stripe, Google and
  Hugging Face keys.

What it does not find: names, postal addresses, dates of birth, free-form identifiers (customer numbers,
passport numbers, most national ids), national-format phone numbers of countries outside `phone_regions`,
cards of issuers outside the table, secrets without a known prefix, and anything inside images or
encoded text (base64). Treat `report` counts as a floor, not a guarantee.
"""

import functools
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers

from llamatailor.vocabulary import DEFAULT_PHONE_REGIONS, PII_KINDS, PiiKind

Span = tuple[int, int]


@dataclass(frozen=True)
class Detector:
    kind: PiiKind
    find: Callable[[str], Iterator[Span]]


@dataclass(frozen=True)
class Finding:
    kind: PiiKind
    start: int
    end: int


def regex_finder(
    pattern: str, valid: Callable[[re.Match[str]], bool] = lambda _: True
) -> Callable[[str], Iterator[Span]]:
    """A finder yielding the (start, end) character spans of `pattern`'s matches that `valid` accepts."""
    compiled = re.compile(pattern)

    def find(text: str) -> Iterator[Span]:
        return (match.span() for match in compiled.finditer(text) if valid(match))

    return find


def luhn_valid(number: str) -> bool:
    """True when the digits of `number` (13 to 19, not one repeated digit) pass the Luhn (mod 10) check."""
    digits = [int(char) for char in number if char.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


# Issuer identification number ranges (ISO/IEC 7812 prefixes as the networks publish them) and the card
# lengths each issuer uses: (lowest prefix, highest prefix, lengths). Prefixes of one range have one width.
SIXTEEN_UP = tuple(range(16, 20))
THIRTEEN_UP = tuple(range(13, 20))
ISSUERS = (
    (4, 4, (13, 16, 19)),  # Visa
    (51, 55, (16,)),  # Mastercard
    (2221, 2720, (16,)),  # Mastercard 2-series
    (34, 34, (15,)),  # American Express
    (37, 37, (15,)),  # American Express
    (6011, 6011, SIXTEEN_UP),  # Discover
    (644, 649, SIXTEEN_UP),  # Discover
    (65, 65, SIXTEEN_UP),  # Discover, RuPay
    (3528, 3589, SIXTEEN_UP),  # JCB
    (300, 305, (14, *SIXTEEN_UP)),  # Diners Club
    (36, 36, (14, *SIXTEEN_UP)),  # Diners Club
    (38, 39, (14, *SIXTEEN_UP)),  # Diners Club
    (62, 62, SIXTEEN_UP),  # UnionPay
    (2200, 2204, SIXTEEN_UP),  # Mir
    (60, 60, (16,)),  # RuPay
    (5018, 5018, THIRTEEN_UP),  # Maestro
    (5020, 5020, THIRTEEN_UP),  # Maestro
    (5038, 5038, THIRTEEN_UP),  # Maestro
    (5893, 5893, THIRTEEN_UP),  # Maestro
    (6304, 6304, THIRTEEN_UP),  # Maestro
    (6759, 6759, THIRTEEN_UP),  # Maestro
    (6761, 6763, THIRTEEN_UP),  # Maestro
)


def card_valid(number: str) -> bool:
    """True when `number`'s digits start with a known issuer prefix, have a length that issuer uses and pass Luhn."""
    digits = "".join(char for char in number if char.isdigit())
    known = any(
        low <= int(digits[: len(str(low))]) <= high and len(digits) in lengths
        for low, high, lengths in ISSUERS
    )
    return known and luhn_valid(digits)


def iban_valid(candidate: str) -> bool:
    """True when `candidate` (spaces allowed) has an IBAN's length and passes the ISO 13616 mod-97 check."""
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rotated = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rotated)) % 97 == 1


# A dotted quad after one of these is a software version or a package pin, not an address.
VERSION_CUE = re.compile(
    r"(?:\b(?:version|ver|release|build|firmware|driver|patch|rev|revision|v)\b\.?\s*(?:is\s+|to\s+)?"
    r"|[=<>~!]=\s*)$",
    re.IGNORECASE,
)


def ipv4_valid(match: re.Match[str]) -> bool:
    """True for a matched dotted quad that can be someone's address: not loopback, unspecified or reserved
    (240/4 holds the netmasks), and not a version or pin by the 24 characters before it (VERSION_CUE)."""
    address = ipaddress.IPv4Address(match.group())
    if address.is_loopback or address.is_unspecified or address.is_reserved:
        return False
    return not VERSION_CUE.search(match.string, max(0, match.start() - 24), match.start())


def ipv6_valid(match: re.Match[str]) -> bool:
    """True when the matched text parses as an IPv6 address (so times such as 12:30:45 do not)."""
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return False
    return True


IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp"}


def email_valid(match: re.Match[str]) -> bool:
    """False for retina image names (`icon@2x.png`), whose "top-level domain" is a file extension."""
    return match.group().rsplit(".", 1)[1].lower() not in IMAGE_EXTENSIONS


# Seven digits or more with at most short punctuation between them: the fewest any numbering plan writes
# (+683 4002). The matcher, slow per digit group, runs only on the stretches around these runs.
PHONE_RUN = re.compile(r"\d(?:[^\w\n]{0,4}\d){6,}")
# Context the matcher reads around a run (a + or "(0)" before it, an extension after), then out to whitespace.
WINDOW_MARGIN = 32
WHITESPACE = re.compile(r"\s")
PLUS_SIGN = re.compile("[+\uff0b]")  # ASCII and full-width, as libphonenumber reads them
PHONE_CUE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|fax|call|ring|whatsapp|sms|text)\b[^\n\d]{0,12}$", re.IGNORECASE
)


def phone_windows(text: str) -> Iterator[Span]:
    """Stretches of `text` holding each run of 7+ digits with WINDOW_MARGIN characters of context either side,
    widened to the nearest whitespace (by at most another margin) and merged where they overlap."""
    window: Span | None = None
    for run in PHONE_RUN.finditer(text):
        left, right = max(0, run.start() - WINDOW_MARGIN), min(len(text), run.end() + WINDOW_MARGIN)
        spaces_before = [
            space.end() for space in WHITESPACE.finditer(text, max(0, left - WINDOW_MARGIN), left)
        ]
        left = spaces_before[-1] if spaces_before else max(0, left - WINDOW_MARGIN)
        space_after = WHITESPACE.search(text, right, right + WINDOW_MARGIN)
        right = space_after.start() if space_after else min(len(text), right + WINDOW_MARGIN)
        if window and left <= window[1]:
            window = (window[0], right)
            continue
        if window:
            yield window
        window = (left, right)
    if window:
        yield window


def find_phones(text: str, regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS) -> Iterator[Span]:
    """Spans of phone numbers that libphonenumber accepts; spans may repeat across passes.

    A number with + names its country, so its plan's rules suffice (Leniency.VALID). Without +, the digits
    could be any id: they must be valid in one of `regions`' plans (ISO 3166 codes) and grouped as that
    country writes its numbers (STRICT_GROUPING: "650 253 0000", not "6502 530000"). An unbroken run of
    digits without + counts only after a phone word (PHONE_CUE) in the 20 characters before it: bare runs
    are usually order or account numbers.
    """
    passes: list[tuple[str | None, int]] = [(None, phonenumbers.Leniency.VALID)]  # (region, leniency)
    passes += [(region, phonenumbers.Leniency.STRICT_GROUPING) for region in regions]
    for left, right in phone_windows(text):
        window = text[left:right]
        for region, leniency in passes:
            if region is None and not PLUS_SIGN.search(window):
                continue  # that pass finds + numbers only
            for match in phonenumbers.PhoneNumberMatcher(window, region, leniency=leniency):
                start, end = left + match.start, left + match.end
                if not match.raw_string.isdigit() or PHONE_CUE.search(text, max(0, start - 20), start):
                    yield start, end


OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Unbroken, 4-4-4-x (x up to 4, then up to 3 more), 4-6-5 or 4-6-4, one separator throughout; not part of a
# longer run of digits or of a dotted, slashed or colon-separated number.
CARD = (
    r"(?<![\w+.,/:-])(?<!\d{4} )"
    r"(?:\d{13,19}|\d{4}([ -])(?:\d{4}\1\d{4}\1(?:\d{4}\1\d{1,3}|\d{1,4})|\d{6}\1\d{4,5}))"
    r"(?!\w|[-.,/:]\d| \d{4})"
)
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


@functools.cache
def detectors(phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS) -> tuple[Detector, ...]:
    """Every kind's detector; order matters: an earlier detector claims its span first (a card number is not
    also a phone number)."""
    return (
        Detector("secret", regex_finder("|".join(SECRET_PATTERNS))),
        Detector(
            "email",
            regex_finder(
                r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
                email_valid,
            ),
        ),
        Detector(
            "iban",
            regex_finder(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", lambda match: iban_valid(match.group())),
        ),
        Detector("card", regex_finder(CARD, lambda match: card_valid(match.group()))),
        Detector(
            "national_id",
            regex_finder(
                r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"  # US SSN
                r"|\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"  # UK NINO
            ),
        ),
        Detector("ip", regex_finder(rf"(?<![\w.]){OCTET}(?:\.{OCTET}){{3}}(?!\w|\.\d)", ipv4_valid)),
        Detector(
            "ip",
            regex_finder(
                r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4})(?![\w:])",
                ipv6_valid,
            ),
        ),
        Detector("phone", functools.partial(find_phones, regions=phone_regions)),
    )


PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in PII_KINDS}


def find_pii(
    text: str, kinds: set[PiiKind], phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS
) -> list[Finding]:
    """Non-overlapping findings of the wanted kinds (names as in PLACEHOLDERS), in text order; phone numbers
    without + are read in `phone_regions`' national formats (ISO 3166 codes, see find_phones).

    Spans are character offsets into `text`; where two detectors claim overlapping text, the one earlier in
    `detectors` keeps it.
    """
    taken: list[Finding] = []
    for detector in detectors(phone_regions):
        if detector.kind not in kinds:
            continue
        for start, end in detector.find(text):
            if not any(start < other.end and other.start < end for other in taken):
                taken.append(Finding(detector.kind, start, end))
    return sorted(taken, key=lambda finding: finding.start)


def mask_pii(text: str, findings: list[Finding]) -> str:
    """`text` with each finding's span replaced by its kind's placeholder (`[PHONE]`); findings in text order."""
    pieces, position = [], 0
    for finding in findings:
        pieces += [text[position : finding.start], PLACEHOLDERS[finding.kind]]
        position = finding.end
    return "".join([*pieces, text[position:]])
