"""Dates that a chat template computes at request time (Llama 3.2's `strftime_now("%d %b %Y")`), kept
computed in the Ollama Go template instead of frozen at the export day.

Rendering with `request_clock(FORMATS)` shows the strftime format a template asks for, marked; each marked
format becomes Go over Ollama's `currentDate` (YYYY-MM-DD, the server's date when the request comes;
`template/template.go` in Ollama's source), which reproduces the strftime text exactly for every date (day,
month number or name, year). Rendering with `request_clock(day)` renders as on `day`, so that the check can
compare at dates that are not today (CHECK_DATES): a template that froze a date cannot pass.
"""

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date, datetime, tzinfo

from transformers.utils import chat_template_utils

# Check dates: never today (a frozen export-day date must fail), every month (month names), days with and
# without a leading zero, several years.
CHECK_DATES = tuple(date(2027 + month % 5, month, 1 + 7 * month % 28) for month in range(1, 13))
DATE_MARK = re.compile("\x01([^\x01]*)\x01")
FORMATS = "formats"  # request_clock value: strftime_now returns its format, marked, instead of a date

# strftime directives that Go can rebuild from currentDate's YYYY-MM-DD: the Go text, the variables it reads
DATE_DIRECTIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Y": ("{{ $year }}", ("year",)),
    "y": ("{{ $year2 }}", ("year2",)),
    "m": ("{{ $month }}", ("month",)),
    "-m": (
        '{{ if eq $month0 "0" }}{{ $month1 }}{{ else }}{{ $month }}{{ end }}',
        ("month", "month0", "month1"),
    ),
    "d": ("{{ $day }}", ("day",)),
    "-d": ('{{ if eq $day0 "0" }}{{ $day1 }}{{ else }}{{ $day }}{{ end }}', ("day", "day0", "day1")),
    "e": ('{{ if eq $day0 "0" }} {{ $day1 }}{{ else }}{{ $day }}{{ end }}', ("day", "day0", "day1")),
    "b": ("{{ $monthAbbr }}", ("month", "monthAbbr")),
    "h": ("{{ $monthAbbr }}", ("month", "monthAbbr")),
    "B": ("{{ $monthName }}", ("month", "monthName")),
    "F": ("{{ $today }}", ()),
    "%": ("%", ()),
}
# The Go variables, in declaration order: a slice of $today, or a month name chosen from $month.
DATE_VARIABLES = {
    "year": "slice $today 0 4",
    "year2": "slice $today 2 4",
    "month": "slice $today 5 7",
    "month0": "slice $today 5 6",
    "month1": "slice $today 6 7",
    "day": "slice $today 8 10",
    "day0": "slice $today 8 9",
    "day1": "slice $today 9 10",
    "monthAbbr": "%b",
    "monthName": "%B",
}


class NoTemplate(ValueError):
    """Why the Modelfile gets no TEMPLATE line (one sentence, written into the Modelfile as a comment)."""


_REQUEST_DATE: ContextVar[date | str | None] = ContextVar("request_date", default=None)
_CLOCK_LOCK = threading.RLock()


class _FormatMarks(datetime):
    def strftime(self, format: str) -> str:
        return f"\x01{format}\x01"


class _RequestClock(datetime):
    """Stands in for `datetime` in transformers' chat_template_utils, whose `strftime_now(format)` is
    `datetime.now().strftime(format)`; only the thread that asked for a date sees it."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]  # a datetime, not cls
        wanted = _REQUEST_DATE.get()
        if isinstance(wanted, date):
            return datetime(wanted.year, wanted.month, wanted.day, 12, tzinfo=tz)
        if wanted == FORMATS:
            return _FormatMarks(2000, 1, 1, tzinfo=tz)
        return datetime.now(tz)


@contextmanager
def request_clock(wanted: date | str) -> Iterator[None]:
    """Inside, chat templates rendered by this thread see `wanted` as the request date (or, with FORMATS,
    the strftime format they ask for). If transformers stops reading the clock this way, dates render from
    the real clock and the check at CHECK_DATES fails: no TEMPLATE rather than a wrong one."""
    token = _REQUEST_DATE.set(wanted)
    with _CLOCK_LOCK:
        original = getattr(chat_template_utils, "datetime", None)
        if original is not None:
            chat_template_utils.datetime = _RequestClock
        try:
            yield
        finally:
            if original is not None:
                chat_template_utils.datetime = original
            _REQUEST_DATE.reset(token)


def go_date(pattern: str) -> tuple[str, list[str]]:
    """A strftime format as Go text over the date variables, and the variables it reads."""
    pieces: list[str] = []
    needed: list[str] = []
    position = 0
    for match in re.finditer(r"%(-?.)", pattern):
        pieces.append(pattern[position : match.start()])
        if match.group(1) not in DATE_DIRECTIVES:
            raise NoTemplate(
                f'the chat template writes the date as strftime "{pattern}", and %{match.group(1)} cannot be '
                "computed by an Ollama template (its date function, currentDate, gives YYYY-MM-DD)"
            )
        text, variables = DATE_DIRECTIVES[match.group(1)]
        pieces.append(text)
        needed += variables
        position = match.end()
    pieces.append(pattern[position:])
    literal = "".join(pieces[::2])
    if "{{" in literal or "}}" in literal or "%" in literal:
        raise NoTemplate(f'the chat template\'s date format "{pattern}" cannot be written as a Go template')
    return "".join(pieces), needed


def month_names(variable: str, pattern: str) -> str:
    """`$variable` set from `$month` to the month's name as strftime writes it here (C locale: Jan, January)."""
    names = [date(2000, month, 1).strftime(pattern) for month in range(1, 13)]
    if any('"' in name or "\\" in name for name in names):
        raise NoTemplate(f"month names {names} cannot be written as Go string literals")
    branches = "".join(
        f'{{{{ {"if" if month == 1 else "else if"} eq $month "{month:02d}" }}}}{{{{ ${variable} = "{name}" }}}}'
        for month, name in enumerate(names, start=1)
    )
    return f'{{{{ ${variable} := "" }}}}{branches}{{{{ end }}}}'


def with_request_dates(template: str) -> str:
    """Each date the Jinja template computed (marked with its strftime format) as Go over Ollama's
    `currentDate`, called once at the top so that every date in one prompt is the same day."""
    needed: set[str] = set()

    def go(match: re.Match[str]) -> str:
        text, variables = go_date(match.group(1))
        needed.update(variables)
        return text

    body = DATE_MARK.sub(go, template)
    if body == template:
        return template
    prologue = ["{{ $today := currentDate }}"]
    for name, source in DATE_VARIABLES.items():
        if name in needed:
            is_slice = source.startswith("slice")
            prologue.append(f"{{{{ ${name} := {source} }}}}" if is_slice else month_names(name, source))
    return "".join(prologue) + body


def check_dates() -> list[date]:
    """The dates templates are compared at: CHECK_DATES, less today should it be one of them."""
    return [day for day in CHECK_DATES if day != date.today()]
