"""Part `model_step`: training-step throughput of the two recipes' models, forward + backward +
clip + optimizer step, the way the Trainer steps (bf16 autocast where the recipe says bf16):
the WikiText-103 QRNN (4 x 2500, tied adaptive softmax over 267,735 words, bf16, bptt 140,
Adam) and the PTB AWD-LSTM (3 x 1150, 10k words, fp32, bptt 70, SGD). Step time and tokens/s
at 1x, 4x and 16x the recipe's global batch, then the largest batch that fits in GPU memory
(doubling from 16x until out of memory, a step slower than 4 s, or the part's time is spent).
"""

from __future__ import annotations

import time

import torch

from .common import PTB_CONFIG, WT103_CONFIG, Plan, free, median_timer

RECIPES = (("WT-103 QRNN", WT103_CONFIG, "wt103_vocab"), ("PTB AWD-LSTM", PTB_CONFIG,
                                                          "ptb_vocab"))
SLOW_STEP_S = 4.0  # the largest-batch search stops above this step time


class Stepper:
    """A recipe's model and optimizer on the device; `step(batch)` runs one optimizer step."""

    def __init__(self, plan: Plan, config: str, vocab: int):
        from ...config import load_config
        from ...models import build_model
        from ...train.optim import build_optimizer

        over = {"train.device": plan.device, **plan.tiny}
        self.cfg = cfg = load_config(config, over)
        self.dev = torch.device(plan.device)
        torch.manual_seed(0)
        self.model = build_model(cfg.model, vocab).to(self.dev).train()
        self.opt = build_optimizer(self.model.parameters(), cfg.optim)
        self.vocab, self.bptt = vocab, cfg.train.bptt
        self.bf16 = cfg.train.bf16
        self.params = sum(p.numel() for p in self.model.parameters())

    def batch(self, b: int):
        tokens = torch.randint(0, self.vocab, (self.bptt + 1, b), device=self.dev)
        hidden = [self.model.init_hidden(b)]
        x, y = tokens[:-1], tokens[1:]

        def step():
            from ...models import detach_hidden

            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.dev.type, torch.bfloat16, enabled=self.bf16):
                out = self.model(x, hidden[0], y)
                loss = out.nll.float().mean() + out.ar + out.tar
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip)
            self.opt.step()
            hidden[0] = detach_hidden(out.hidden)

        return step


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def recipe_rows(plan: Plan, label: str, config: str, vocab: int, deadline: float) -> list[dict]:
    st = Stepper(plan, config, vocab)
    median = median_timer(st.dev)
    base = st.cfg.train.global_batch
    tag = f"{label} ({st.params / 1e6:.0f}M params, V={vocab:,}, bptt {st.bptt}, " \
          f"{'bf16' if st.bf16 else 'fp32'})"
    rows, t1 = [], None
    for m in plan.step_mults:
        b = base * m
        t = median(st.batch(b), plan.step_reps, 1)
        t1 = t1 or t
        rows.append({"name": f"{tag}: step at {m}x batch ({b})", "value": t * 1e3, "unit": "ms",
                     "tokens_per_s": b * st.bptt / t, "baseline": t1 * 1e3,
                     "ratio": t / t1})
        rows.append({"name": f"{tag}: tokens/s at {m}x batch ({b})", "value": b * st.bptt / t,
                     "unit": "tokens/s"})
        free()
    # the largest batch that fits: doubling from the last size
    fits, b, why = base * plan.step_mults[-1], base * plan.step_mults[-1] * 2, "limit"
    while b <= base * plan.max_batch_mult:
        if time.time() > deadline:
            why = "time"
            break
        try:
            t0 = time.perf_counter()
            step = st.batch(b)
            step()
            if st.dev.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
        except RuntimeError as exc:
            if not _oom(exc):
                raise
            why = "out of memory"
            break
        finally:
            step = None
            free()
        fits = b
        if secs > SLOW_STEP_S:
            why = f"step over {SLOW_STEP_S:.0f} s"
            break
        b *= 2
    peak = torch.cuda.max_memory_allocated() / 2**30 if st.dev.type == "cuda" else "n/a"
    rows.append({"name": f"{tag}: largest global batch that fits (doubling; stopped by {why})",
                 "value": fits, "unit": "streams", "baseline": base, "ratio": fits / base,
                 "peak_mem_gib": peak})
    del st
    free()
    return rows


def cases(plan: Plan, ctx) -> list[tuple[str, object]]:
    budget = ctx.get("budget_s", 120.0)

    def make(label, config, attr, share):
        def case():
            deadline = time.time() + share * budget
            return recipe_rows(plan, label, config, getattr(plan, attr), deadline)
        return case

    # the WT-103 model is the bigger one: more of the part's time for its batch search
    return [(label, make(label, config, attr, 0.55 if i == 0 else 0.35))
            for i, (label, config, attr) in enumerate(RECIPES)]
