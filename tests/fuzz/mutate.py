"""Text mutations shared by the IR and model generators.

Token-aware edits (delete, repeat, swap, replace with another token or a
near miss), character edits (insert odd characters, truncate), line edits,
and the pathological inputs that once hung or crashed the tools: an
unterminated string, deep nesting, a 5,000-digit number. Every mutation
changes the text.
"""

from __future__ import annotations

import random
import re

TOKEN = re.compile(r"\s+|->|%[\w.]+|@\w+|![\w.]+|#[\w.]+|\"[^\"\n]*\"|[\w.+-]+|[^\s\w]")

NUMBERS = ["0", "-1", "1", "2", "1e400", "-1e400", "nan", "inf", "0x7FF8000000000000",
           "9223372036854775807", "9223372036854775808", "18446744073709551616",
           "99999999999999999999", "-9223372036854775809", "16384", "16385",
           "1099511627777", "4.5", "1e-320", "0.0", "-0.0", "3.4e38", "1e39"]
ODD_CHARS = ["\f", "\v", "\x00", "\x1c", "\r", "\t", "é", "→", "\u2028", '"', "\\", "{", "}",
             "<", ">", "(", ")", "%", "@", "^", "#", "!", "?", ":", ",", "=", ";", "/"]


def tokens(text: str) -> list[str]:
    found = TOKEN.findall(text)
    return found if "".join(found) == text else list(text)


def mutate(text: str, rng: random.Random, vocabulary: list[str], rounds: int = 3) -> str:
    """1..`rounds` random edits of `text`; never returns `text` unchanged."""
    for _ in range(20):
        out = text
        for _ in range(rng.randrange(1, rounds + 1)):
            out = _one(out, rng, vocabulary)
        if out != text:
            return out
    return text + rng.choice(ODD_CHARS)


def _one(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    toks = tokens(text)
    words = [i for i, t in enumerate(toks) if not t.isspace()] or [0]
    if not toks:
        return rng.choice(vocabulary + NUMBERS)
    i = rng.choice(words)
    kind = rng.randrange(14)
    if kind == 0:
        toks[i] = ""
    elif kind == 1:
        toks[i] = toks[i] + " " + toks[i]
    elif kind == 2:
        j = rng.choice(words)
        toks[i], toks[j] = toks[j], toks[i]
    elif kind == 3:
        toks[i] = toks[rng.choice(words)]
    elif kind in (4, 5):
        toks[i] = rng.choice(vocabulary)
    elif kind == 6:
        numeric = [k for k in words if re.fullmatch(r"[-+]?[0-9][\w.+-]*", toks[k])]
        toks[rng.choice(numeric or words)] = rng.choice(NUMBERS)
    elif kind == 7:
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + rng.choice(ODD_CHARS) + text[pos:]
    elif kind == 8:
        return text[:rng.randrange(len(text) + 1)]
    elif kind in (9, 10):
        lines = text.split("\n")
        k = rng.randrange(len(lines))
        if kind == 9:
            lines.insert(k, lines[k])
        else:
            del lines[k]
        return "\n".join(lines)
    elif kind == 11:
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + '"' + "a" * rng.randrange(20, 60) + text[pos:]
    elif kind == 12:
        depth = rng.choice([70, 200, 1000])
        pos = rng.randrange(len(text) + 1)
        nest = rng.choice(["{", "(", "[", "<", "builtin.module {"])
        close = {"{": "}", "(": ")", "[": "]", "<": ">"}[nest[-1]]
        return text[:pos] + nest * depth + close * depth + text[pos:]
    else:
        toks[i] = rng.choice(["9" * 5000, "1" + "0" * 400, "i" + "9" * 30])
    return "".join(toks)
