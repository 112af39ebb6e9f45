"""Names someone else chose, made safe for the three places tinynet shows them.

Class names come from folder names and from model files, file names from
whoever filled a folder: text that tinynet did not write.  Each place that
shows such a name has its own interpreter, and each gets one function here:

- a terminal interprets control characters (ESC starts a sequence that can
  retitle the window, move the cursor or clear the screen; BEL rings;
  a CR rewrites the line): :func:`printable` escapes them;
- a spreadsheet that opens a CSV file runs a cell that starts with ``=``,
  ``+``, ``-`` or ``@`` as a formula: :func:`csv_cell` makes it text, as
  OWASP's "CSV Injection" page recommends;
- matplotlib parses ``$...$`` as mathtext (and, with ``text.usetex``, hands
  the text to LaTeX, an external program): :mod:`tinynet.plots` switches both
  off for every text it draws (``parse_math=False, usetex=False``).

Web pages (``report.html``) use :func:`html.escape`.
"""
from __future__ import annotations

import unicodedata

__all__ = ["printable", "csv_cell", "CSV_FORMULA_STARTS"]

# Unicode's bidirectional controls reorder how a terminal displays the text around them (the
# "Trojan Source" trick, CVE-2021-42574): a name could show as another name.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _needs_escape(char: str) -> bool:
    """C0 (U+0000-U+001F, tab and newline included), DEL, C1 (U+0080-U+009F), bidi controls, lone surrogates.

    Surrogates are how Python spells the bytes of a file name that is not
    valid UTF-8 (``os.fsdecode``'s ``surrogateescape``); printed raw they
    raise ``UnicodeEncodeError``.
    """
    return unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI_CONTROLS


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte itself
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text) -> str:
    """``str(text)`` with every control character written as a visible escape, for a terminal or a log.

    ESC becomes ``\\x1b``, BEL ``\\x07``, a newline ``\\x0a`` (so one name is
    one line, and cannot forge the next), DEL ``\\x7f``, C1 controls
    ``\\x9b``, the bidirectional controls ``\\u202e``; an undecodable byte of
    a file name (a lone surrogate) becomes ``\\xff``.  Everything else,
    accents and other scripts included, is unchanged, and so are backslashes
    (a Windows path stays readable), so the escape is for showing a name,
    not for reading it back.
    """
    text = str(text)
    if not any(map(_needs_escape, text)):  # the common case: one pass, no new string
        return text
    return "".join(_escape(c) if _needs_escape(c) else c for c in text)


#: What makes a spreadsheet (Excel, LibreOffice Calc, Google Sheets) read a cell as a formula: OWASP's
#: list (= + - @ tab CR), NUL (OWASP ASVS 1.2.10), LF, and the full-width forms of the four signs, which
#: some East Asian versions of Excel treat as the signs themselves.
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\0", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(text) -> str:
    """``str(text)``, with a ``'`` in front when it starts like a formula; the ``csv`` module does the quoting.

    OWASP's advice for CSV injection: a cell that starts with ``=``, ``+``,
    ``-``, ``@``, a tab or a CR gets a leading single quote, which
    spreadsheets read as "this cell is text" (and do not show).  The price:
    a program that reads the CSV sees ``'-photo.jpg`` for a file named
    ``-photo.jpg``.  Numbers that tinynet writes itself (probabilities)
    never need this and should not be passed here.
    """
    text = str(text)
    return "'" + text if text.startswith(CSV_FORMULA_STARTS) else text
