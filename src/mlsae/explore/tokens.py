"""Readable tokens for the explorer: each token's raw bytes, and a sequence's display strings with
a character split over several tokens (emoji, CJK, ...) shown whole on the token where it starts
and the continuation tokens shown as their bytes (e.g. `⟨8E 89⟩`), never as U+FFFD.

Whitespace stays as text here; the page draws it as ␣ ↵ ⇥.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte fallback


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable stand-in character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The raw bytes of each token id: its decoded text when that is clean UTF-8, else read from
    the tokenizer's byte-level (GPT-2) or byte-fallback (`<0xHH>`) token string."""
    out = []
    dec = _byte_decoder()
    for i in ids:
        text = tokenizer.decode([i])
        if REPLACEMENT not in text:
            out.append(text.encode("utf-8"))
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        m = _BYTE_TOKEN.match(piece or "")
        if m:
            out.append(bytes([int(m.group(1), 16)]))
        elif piece and all(c in dec for c in piece):
            out.append(bytes(dec[c] for c in piece))
        else:
            out.append(text.encode("utf-8"))
    return out


def _hex(b: bytes) -> str:
    return "⟨" + " ".join(f"{x:02X}" for x in b) + "⟩"


def display_tokens(parts: list[bytes]) -> list[str]:
    """Display string of each token of a sequence: the UTF-8 characters that start in it (a
    character split over tokens is shown whole where it starts), and any bytes that belong to no
    whole character (a continuation, or a character cut off by the sequence's ends) as hex."""
    data = b"".join(parts)
    owner = []  # token index of each byte
    for t, p in enumerate(parts):
        owner += [t] * len(p)
    texts = [""] * len(parts)
    loose: list[bytearray] = [bytearray() for _ in parts]  # bytes of no whole character
    i = 0
    while i < len(data):
        n = _utf8_len(data[i])
        chunk = data[i : i + n]
        try:
            ch = chunk.decode("utf-8") if n else None
        except UnicodeDecodeError:
            ch = None
        if ch is None:
            loose[owner[i]].append(data[i])
            i += 1
            continue
        texts[owner[i]] += ch
        for b in range(i + 1, i + n):  # a character's bytes in later tokens: shown as bytes there
            if owner[b] != owner[i]:
                loose[owner[b]].append(data[b])
        i += n
    out = []
    for t, text in enumerate(texts):
        out.append(text + (_hex(bytes(loose[t])) if loose[t] else ""))
    return out


def _utf8_len(first: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts (0: not a lead byte)."""
    if first < 0x80:
        return 1
    if 0xC2 <= first <= 0xDF:
        return 2
    if 0xE0 <= first <= 0xEF:
        return 3
    if 0xF0 <= first <= 0xF4:
        return 4
    return 0
