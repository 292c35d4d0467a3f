"""Readers of request traces: their (input, output) lengths in tokens and arrival times, for ``Workload``.

Formats (told apart by their content):
  * CSV with a header: Vidur/Splitwise ``num_prefill_tokens,num_decode_tokens[,arrived_at]``, the Azure LLM
    inference trace ``TIMESTAMP,ContextTokens,GeneratedTokens``, BurstGPT ``Timestamp,...,Request tokens,Response
    tokens,...`` (its failed requests, with no response tokens, are skipped and counted);
  * JSON Lines, Mooncake's ``{"timestamp": ms, "input_length": n, "output_length": n, ...}`` per line;
  * JSON, a ShareGPT-style list of ``{"conversations": [{"from": "human", "value": text}, {"from": "gpt", ...}]}``:
    the first human turn is the prompt and the reply after it the output. There is no tokenizer here, so a text's
    length is counted as ceil(characters / 4) tokens (about four characters a token for English under GPT-style
    BPE tokenizers); give token counts in another format where that matters.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from .errors import ExeGPTError

CHARS_PER_TOKEN = 4
"""Characters counted as one token in a trace that has text (ShareGPT)."""

# CSV layouts: (input column, output column, arrival column or None, skip rows without output).
CSV_LAYOUTS = (
    ("num_prefill_tokens", "num_decode_tokens", "arrived_at", False),  # Vidur / Splitwise
    ("ContextTokens", "GeneratedTokens", "TIMESTAMP", False),         # Azure LLM inference trace
    ("Request tokens", "Response tokens", "Timestamp", True),         # BurstGPT (failed requests: 0 tokens)
)


def parse(text: str, source: str) -> tuple[list[tuple[int, int]], list[float] | None, int]:
    """(pairs, arrival seconds or None, requests skipped) of a trace's text."""
    head = text.lstrip()[:1]
    if head == "[":
        return _sharegpt(text, source)
    if head == "{":
        return _jsonl(text, source)
    return _csv(text, source)


def _csv(text: str, source: str):
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    layout = next((lay for lay in CSV_LAYOUTS if lay[0] in header and lay[1] in header), None)
    if layout is None:
        raise ExeGPTError(f"trace {source!r} has columns {header}; expected num_prefill_tokens,num_decode_tokens"
                          f"[,arrived_at], TIMESTAMP,ContextTokens,GeneratedTokens (Azure), Request tokens,"
                          f"Response tokens (BurstGPT), Mooncake JSON lines or ShareGPT JSON")
    i_in, i_out = header.index(layout[0]), header.index(layout[1])
    i_t = header.index(layout[2]) if layout[2] in header else None
    pairs, times, skipped = [], [], 0
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            a, b = float(row[i_in]), float(row[i_out])
            t = _parse_time(row[i_t]) if i_t is not None else None
        except (ValueError, IndexError):
            raise ExeGPTError(f"trace {source!r} line {line_no}: expected numbers in {layout[0]},{layout[1]}, "
                              f"got {row!r}") from None
        if layout[3] and (a < 1 or b < 1):
            skipped += 1
            continue
        pairs.append(_lengths(a, b, f"trace {source!r} line {line_no}"))
        times.append(t)
    return _done(pairs, times if i_t is not None else None, skipped, source)


def _jsonl(text: str, source: str):
    pairs, times = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            a, b, t = d["input_length"], d["output_length"], d.get("timestamp")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ExeGPTError(f"trace {source!r} line {line_no}: expected a JSON object with input_length and "
                              f"output_length (Mooncake), got {line[:80]!r}") from None
        pairs.append(_lengths(a, b, f"trace {source!r} line {line_no}"))
        times.append(None if t is None else float(t) / 1000.0)  # Mooncake's timestamps are milliseconds
    return _done(pairs, None if any(t is None for t in times) else times, 0, source)


def _sharegpt(text: str, source: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExeGPTError(f"trace {source!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    pairs, skipped = [], 0
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or [] if isinstance(item, dict) else []
        pair = next(((_tokens(q.get("value", "")), _tokens(r.get("value", "")))
                     for q, r in zip(turns, turns[1:])
                     if isinstance(q, dict) and isinstance(r, dict) and q.get("from") in ("human", "user")
                     and r.get("from") in ("gpt", "assistant", "chatgpt")), None)
        if pair is None or min(pair) < 1:
            skipped += 1
            continue
        pairs.append(pair)
    return _done(pairs, None, skipped, source)


def _tokens(value) -> int:
    return math.ceil(len(value) / CHARS_PER_TOKEN) if isinstance(value, str) else 0


def _lengths(a, b, where: str) -> tuple[int, int]:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        raise ExeGPTError(f"{where}: lengths must be numbers, got {a!r}, {b!r}") from None
    if a < 1 or b < 1 or a != int(a) or b != int(b):
        raise ExeGPTError(f"{where}: lengths must be whole numbers >= 1, got input={a!r} output={b!r}")
    return int(a), int(b)


def _done(pairs, times, skipped: int, source: str):
    if not pairs:
        raise ExeGPTError(f"trace {source!r} has no requests" + (f" ({skipped} skipped)" if skipped else ""))
    return pairs, times, skipped


def _parse_time(s: str) -> float:
    """Seconds from a number or a wall-clock timestamp (Azure's ``2023-11-16 18:15:46.6805900``)."""
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        return float(np.datetime64(s.replace(" ", "T")[:26]).astype("datetime64[us]").astype(np.int64)) / 1e6
