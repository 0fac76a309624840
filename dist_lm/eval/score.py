"""Scoring text: per-token log-probabilities (natural log) and their total / average.

    dist-lm score runs/ptb sentences.txt              # one JSON object per non-blank line
    dist-lm score runs/ptb story.txt --per text       # the whole file as one stream

Each line is encoded as in training (`encode_line`: words not in the vocabulary become
`<unk>`, counted in `n_unk`; every vocabulary appends its `<eos>` -- word, char and bpe the
`<eos>` symbol, byte the newline byte -- so the line's end is scored too) and conditioned on
a preceding `<eos>`, the state the model sees at the start of every line of its training
stream. Every token of the line, the first included, is scored.

Output per line: {"line", "text", "tokens", "logprobs", "total", "avg", "ppl", "n_tokens",
"n_unk"}; "avg" is total / n_tokens and "ppl" = exp(-avg).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..fileio import write_text_atomic
from ..errors import UserError

LINE_BATCH = 32  # lines scored side by side (padded at the end: the model is causal)
WINDOW = 256     # tokens per forward pass for --per text


def _context(tokenizer, ids: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, targets) for ids: every id is a target, the first one read after <eos>."""
    return [tokenizer.eos_id] + ids[:-1], ids


@torch.no_grad()
def _score_sequences(model, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """Log-probabilities of each (inputs, targets) pair, batched with end padding."""
    device = next(model.parameters()).device
    out_lp: list[list[float]] = []
    for s in range(0, len(pairs), LINE_BATCH):
        chunk = pairs[s:s + LINE_BATCH]
        T = max(len(t) for _, t in chunk)
        if T == 0:
            out_lp.extend([] for _ in chunk)
            continue
        inp = torch.zeros(T, len(chunk), dtype=torch.long)
        tgt = torch.zeros(T, len(chunk), dtype=torch.long)
        for j, (i, t) in enumerate(chunk):
            inp[:len(i), j] = torch.tensor(i, dtype=torch.long)
            tgt[:len(t), j] = torch.tensor(t, dtype=torch.long)
        out = model(inp.to(device), model.init_hidden(len(chunk)), tgt.to(device))
        lp = (-out.nll.double()).cpu()
        out_lp.extend(lp[:len(t), j].tolist() for j, (_, t) in enumerate(chunk))
    return out_lp


@torch.no_grad()
def _score_stream(model, inputs: list[int], targets: list[int]) -> list[float]:
    """One long sequence in windows of WINDOW tokens, hidden state carried."""
    from ..models import detach_hidden

    device = next(model.parameters()).device
    hidden = model.init_hidden(1)
    lps: list[float] = []
    for s in range(0, len(targets), WINDOW):
        i = torch.tensor(inputs[s:s + WINDOW], dtype=torch.long, device=device).unsqueeze(1)
        t = torch.tensor(targets[s:s + WINDOW], dtype=torch.long, device=device).unsqueeze(1)
        out = model(i, hidden, t)
        hidden = detach_hidden(out.hidden)
        lps.extend((-out.nll.double())[:, 0].tolist())
    return lps


def _record(tokenizer, text: str, targets: list[int], lps: list[float],
            line: int | None = None) -> dict:
    total = float(sum(lps))
    n = len(lps)
    rec = {"line": line} if line is not None else {}
    rec.update(text=text, tokens=[tokenizer.itos[i] for i in targets], logprobs=lps,
               total=total, avg=total / n if n else 0.0,
               ppl=math.exp(-total / n) if n else None, n_tokens=n,
               n_unk=sum(1 for i in targets if i == tokenizer.unk_id) if tokenizer.unk_id is not None else 0)
    return rec


def score_text(run, text: str, per: str = "line") -> list[dict]:
    """Score `text` with a loaded Run: one record per non-blank line, or one for the text."""
    if per not in ("line", "text"):
        raise UserError(f"--per must be 'line' or 'text'; got {per!r}.")
    tok, model = run.tokenizer, run.model
    model.eval()
    if not text.strip():
        raise UserError("nothing to score: the input is empty (or only blank lines).")
    if per == "text":
        ids = tok.encode(text)
        inputs, targets = _context(tok, ids)
        return [_record(tok, text, targets, _score_stream(model, inputs, targets))]
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    pairs = [_context(tok, tok.encode_line(line)) for _, line in lines]
    lps = _score_sequences(model, pairs)
    return [_record(tok, line, t, lp, n) for (n, line), (_, t), lp in zip(lines, pairs, lps)]


def score_command(path: str, file: str, per: str = "line", out: str | None = None) -> None:
    from ..run.inference import load_run

    if per not in ("line", "text"):
        raise UserError(f"--per must be 'line' or 'text'; got {per!r}.")
    file = str(file)  # fire reads a name like 2024 as a number
    where = "standard input" if file == "-" else file
    try:
        if file == "-":
            raw = getattr(sys.stdin, "buffer", None)  # bytes: the locale's encoding plays no part
            text = sys.stdin.read() if raw is None else raw.read().decode("utf-8")
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text does
        else:
            p = Path(file)
            if not p.is_file():
                raise UserError(f"{p} does not exist; pass a text file to score (or - for stdin).")
            text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) "
                        f"and score it again.") from None
    if not text.strip():
        raise UserError(f"nothing to score: {where} is empty (or only blank lines).")
    run = load_run(path)
    records = score_text(run, text, per=per)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if out is None:
        sys.stdout.write(lines)
        return
    write_text_atomic(out, lines)
