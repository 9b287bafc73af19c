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


def mutate(text: str, rng: random.Random, vocabulary: list[str], rounds: int = 3,
           gentle: bool = False) -> str:
    """1..`rounds` random edits of `text`; never returns `text` unchanged.

    `gentle` edits only replace one token by another or a near miss: the
    text mostly still parses, so the verifiers and passes see it.
    """
    for _ in range(20):
        out = text
        for _ in range(rng.randrange(1, rounds + 1)):
            out = _one(out, rng, vocabulary, gentle)
        if out != text:
            return out
    return text + rng.choice(ODD_CHARS)


def _one(text: str, rng: random.Random, vocabulary: list[str], gentle: bool = False) -> str:
    toks = tokens(text)
    words = [i for i, t in enumerate(toks) if not t.isspace()] or [0]
    if not toks:
        return rng.choice(vocabulary + NUMBERS)
    i = rng.choice(words)
    kind = 14 if gentle else rng.randrange(15)
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
    elif kind == 13:
        toks[i] = rng.choice(["9" * 5000, "1" + "0" * 400, "i" + "9" * 30])
    else:  # every occurrence of one token, by one of its kind: the text stays consistent
        old = toks[i]
        new = _same_kind(old, rng, [toks[k] for k in words] + vocabulary)
        toks = [new if t == old else t for t in toks]
    return "".join(toks)


INTS = ["0", "1", "2", "3", "7", "64", "1000", "-1", "65536"]
FLOATS = ["0.0", "-1.0", "1.000000e+00", "2.5", "1.0e-30", "1.0e+30", "-0.5"]
SCALARS = ["f16", "bf16", "f32", "f64", "i1", "i8", "i32", "i64", "index"]


def _same_kind(old: str, rng: random.Random, pool: list[str]) -> str:
    """A replacement of the same kind: a number for a number, a string for a string."""
    if re.fullmatch(r"-?[0-9]+", old):
        return rng.choice(INTS)
    if re.fullmatch(r"-?[0-9]+\.[0-9]*(e[-+]?[0-9]+)?", old):
        return rng.choice(FLOATS)
    if old.startswith('"'):
        return rng.choice([t for t in pool if t.startswith('"')] or ['""'])
    if old in SCALARS:
        return rng.choice(SCALARS)
    if old[:1] in "%@" or re.fullmatch(r"[A-Za-z_]\w*", old):  # names, keywords
        kin = [t for t in pool if t[:1] == old[:1] and t != old]
        return rng.choice(kin) if kin else old
    return old  # punctuation: no edit of the same kind (the caller tries another)
