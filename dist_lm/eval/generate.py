"""Sampling text from a trained model: temperature, top-k, top-p (nucleus), seeded.

    dist-lm generate runs/ptb --prompt "the company said" --length 50 --top_p 0.9 --seed 1

Works for every head through `model.log_prob` (the full next-token distribution). Samples
run side by side as the columns of one batch. The prompt is tokenized without its trailing
`<eos>` and read after an `<eos>`, so generation starts at the start of a line, as the model
saw it in training; an empty prompt starts right after that `<eos>`. Every vocabulary has one:
word, char and bpe the `<eos>` symbol, byte the newline byte.
The same seed on the same machine gives the same text (a private torch.Generator; sampling
happens on the CPU so the device does not change the draw).
"""

from __future__ import annotations

import sys

import torch

from ..errors import UserError


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """[b, V] log-scores -> log-scores with the excluded tokens at -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already >= p
        drop[:, 0] = False                             # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


def start_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids to condition on: <eos>, then the prompt (without its trailing <eos>).

    PTB-char vocabularies (space-separated characters, `_` between words) take a prompt
    written as plain text: "the cat" is read as "t h e _ c a t"."""
    if (tokenizer.kind == "char" and getattr(tokenizer, "split", "") == "whitespace"
            and any(len(w) > 1 for w in prompt.split())):
        prompt = " ".join("_" if c == " " else c for c in " ".join(prompt.split()))
    ids = tokenizer.encode_line(prompt)[:-1] if prompt else []  # encode_line ends with <eos>
    return [tokenizer.eos_id] + ids


@torch.no_grad()
def sample_ids(model: torch.nn.Module, context: list[int], length: int, samples: int = 1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0) -> list[list[int]]:
    """`samples` continuations of `length` tokens after `context` (ids)."""
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0; got {temperature}.")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1]; got {top_p}.")
    if top_k < 0 or length < 0 or samples < 1:
        raise UserError("--top_k and --length must be >= 0 and --samples >= 1.")
    from ..models import detach_hidden

    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.tensor(context, dtype=torch.long, device=device).unsqueeze(1).repeat(1, samples)
    hidden = model.init_hidden(samples)
    out_ids: list[torch.Tensor] = []
    for _ in range(length):
        out = model(inputs, hidden)
        hidden = detach_hidden(out.hidden)
        logp = model.log_prob(out.output[-1:])[0]                 # [samples, V]
        probs = torch.softmax(filter_logits(logp, temperature, top_k, top_p), -1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]   # [samples]
        out_ids.append(nxt)
        inputs = nxt.to(device).unsqueeze(0)
    if not out_ids:
        return [[] for _ in range(samples)]
    return torch.stack(out_ids, 1).tolist()


def detokenize(tokenizer, ids: list[int]) -> str:
    """Text for ids: words joined by spaces, characters joined, `<eos>` as a newline; PTB-char's
    `_` word boundary becomes a space; byte and bpe vocabularies use the tokenizer's decode."""
    kind = tokenizer.kind
    if kind not in ("word", "char"):
        return tokenizer.decode(ids)
    eos = tokenizer.eos_id
    itos = tokenizer.itos
    underscore_space = kind == "char" and "_" in tokenizer.stoi and " " not in tokenizer.stoi
    lines, cur = [], []
    for i in ids:
        if i == eos:
            lines.append(cur)
            cur = []
        else:
            tok = itos[i]
            cur.append(" " if underscore_space and tok == "_" else tok)
    lines.append(cur)
    sep = " " if kind == "word" else ""
    return "\n".join(sep.join(line).strip() if kind == "word" else "".join(line) for line in lines)


def generate_text(run, prompt: str = "", length: int = 100, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, samples: int = 1) -> list[str]:
    """Texts (the prompt followed by its continuation) sampled from a loaded Run."""
    tok = run.tokenizer
    ctx = start_ids(tok, prompt)
    if prompt and tok.unk_id is not None:
        n_unk = sum(1 for i in ctx if i == tok.unk_id)
        if n_unk and "<unk>" not in prompt:
            print(f"dist-lm: note: {n_unk} prompt token(s) are not in the vocabulary and "
                  f"became <unk>", file=sys.stderr)
    conts = sample_ids(run.model, ctx, length, samples, temperature, top_k, top_p, seed)
    shown = ctx[1:]  # the prompt, without the <eos> it was read after
    return [detokenize(tok, shown + c) for c in conts]


def generate_command(path: str, prompt: str = "", length: int = 100, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, samples: int = 1) -> None:
    from ..run.inference import load_run

    run = load_run(path)
    texts = generate_text(run, prompt=str(prompt), length=length, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, samples=samples)
    for i, text in enumerate(texts):
        if samples > 1:
            print(f"=== sample {i + 1}")
        print(text)
