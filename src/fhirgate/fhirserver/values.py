"""FHIR value semantics shared by indexing (write) and search (read).

Dates (R4 search §3.1.1.4.6 / datatypes §2.24.0.1): every date, dateTime, instant or Period is an
interval; we store and compare intervals as integer milliseconds since the Unix epoch, `low` and
`high` both inclusive. A value without a time zone is taken as UTC (documented in the README).
Strings (R4 search §3.1.1.4.7): matching is case- and accent-insensitive, so both sides go
through `normalize_string`. Numbers (§3.1.1.4.2): a search value carries an implicit range from
its significant figures.
"""

from __future__ import annotations

import calendar
import re
import unicodedata
from decimal import Decimal, InvalidOperation

#: Open ends of a Period, and the bounds of any date range.
DATE_MIN = -(2**62)
DATE_MAX = 2**62

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class DateFormatError(ValueError):
    """Not a FHIR date, dateTime or instant."""


def date_range(text: str) -> tuple[int, int]:
    """The interval a FHIR date/dateTime/instant denotes, in ms since the epoch (both inclusive).

    `2020` -> the whole year; `2020-03` -> March; `2020-03-04` -> that day (UTC);
    `2020-03-04T10:00` -> that minute; seconds -> that second; fractions -> that millisecond.
    """
    m = _DATE_RE.match(text)
    if m is None:
        raise DateFormatError(
            f"'{text}' is not a valid FHIR date (expected YYYY, YYYY-MM, YYYY-MM-DD or "
            "YYYY-MM-DDThh:mm:ss[.sss](Z|+hh:mm))"
        )
    year = int(m["y"])
    month = int(m["m"]) if m["m"] else None
    day = int(m["d"]) if m["d"] else None
    try:
        if month is None:
            start = _ms(year, 1, 1)
            end = _ms(year + 1, 1, 1)
        elif day is None:
            if not 1 <= month <= 12:
                raise ValueError
            start = _ms(year, month, 1)
            end = _ms(year + (month == 12), month % 12 + 1, 1)
        else:
            if not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(year, month)[1]:
                raise ValueError
            start = _ms(year, month, day)
            if m["H"] is None:
                end = start + 86_400_000
            else:
                hour, minute = int(m["H"]), int(m["M"])
                second = int(m["S"]) if m["S"] else 0
                if hour > 24 or minute > 59 or second > 60 or (hour == 24 and (minute or second)):
                    raise ValueError
                start += ((hour * 60 + minute) * 60 + second) * 1000
                if m["S"] is None:
                    end = start + 60_000
                elif m["f"] is None:
                    end = start + 1000
                else:
                    start += int(m["f"][:3].ljust(3, "0"))
                    end = start + 1
                tz = m["tz"]
                if tz and tz != "Z":
                    sign = 1 if tz[0] == "+" else -1
                    offset = (int(tz[1:3]) * 60 + int(tz[4:6])) * 60_000
                    if int(tz[1:3]) > 14 or int(tz[4:6]) > 59:
                        raise ValueError
                    start -= sign * offset
                    end -= sign * offset
    except ValueError:
        raise DateFormatError(f"'{text}' is not a valid calendar date or time") from None
    return start, end - 1


def _ms(year: int, month: int, day: int) -> int:
    return calendar.timegm((year, month, day, 0, 0, 0, 0, 0, 0)) * 1000


def period_range(start: str | None, end: str | None) -> tuple[int, int]:
    """A Period: from the start of `start` to the end of `end`; a missing end is open."""
    low = date_range(start)[0] if start else DATE_MIN
    high = date_range(end)[1] if end else DATE_MAX
    return low, high


def normalize_string(text: str) -> str:
    """Case- and accent-insensitive form used for string index values and string searches."""
    if text.isascii():  # NFKD and accent stripping change nothing in ASCII; casefold == lower
        return " ".join(text.lower().split())
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())


def number_range(text: str) -> tuple[Decimal, Decimal, Decimal]:
    """(value, low, high) for a search number: the implicit range of its significant figures.

    `100` -> [99.5, 100.5); `100.00` -> [99.995, 100.005); `1e2` -> [50, 150).
    """
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"'{text}' is not a number") from None
    if not value.is_finite():
        raise ValueError(f"'{text}' is not a finite number")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)
    return value, value - half, value + half
