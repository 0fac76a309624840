"""The batch geometry: how train.global_batch streams split over ranks, passes and steps.

    B = global_batch = world * accum * micro

Every optimizer step takes the next window of all B streams: each rank its b = B / world
columns, in accum forward/backward passes of micro streams each (each stream with its own
hidden state). The micro batch is train.micro_batch, or the largest divisor of b whose pass
(micro x the longest window) stays within train.max_micro_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.prepared import window_cap
from ..errors import UserError

# train.max_micro_tokens = 0: tokens per forward pass (micro batch x longest window) by device.
# Not tuned by a measurement: on CPU 16384 tokens keep one pass's fp32 logits of a 10k-word
# softmax at 655 MB (twice that with their gradient), within a laptop's memory, while every
# recipe's own batch but the character ones still runs in one pass; CUDA devices hold 4x that.
MICRO_TOKENS = {"cpu": 16384, "cuda": 65536}


def micro_token_cap(max_micro_tokens: int, device: torch.device) -> int:
    """The cap train.max_micro_tokens means on `device` (0: its default; -1: none, returned 0)."""
    if max_micro_tokens < 0:
        return 0
    return max_micro_tokens or MICRO_TOKENS.get(device.type, MICRO_TOKENS["cuda"])


def auto_micro_batch(per_rank: int, window: int, cap: int) -> int:
    """The largest divisor m of the per-rank streams with m * window <= cap tokens (at least 1:
    one stream per pass when even that exceeds the cap; all of them when cap is 0)."""
    if cap <= 0:
        return per_rank
    return max(m for m in range(1, per_rank + 1)
               if per_rank % m == 0 and (m == 1 or m * window <= cap))


@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int
    world: int
    micro: int      # streams per forward/backward pass
    accum: int      # passes per optimizer step
    micro_cap: int  # tokens per pass the micro batch was chosen under (0: no cap)
    micro_auto: bool

    @classmethod
    def resolve(cls, t, world: int, device: torch.device) -> "BatchGeometry":
        """From the config's train table (train.global_batch, micro_batch, max_micro_tokens,
        bptt, max_seq_len, variable_bptt); a batch that does not divide is a UserError."""
        B = t.global_batch
        if B % world:
            raise UserError(f"train.global_batch={B} does not divide over {world} ranks; "
                            f"choose a multiple of {world}.")
        b = B // world
        cap = micro_token_cap(t.max_micro_tokens, device)
        window = window_cap(t.bptt, t.max_seq_len) if t.variable_bptt else t.bptt
        micro = t.micro_batch or auto_micro_batch(b, window, cap)
        if b % micro:
            raise UserError(f"train.micro_batch={micro} does not divide the {b} streams per "
                            f"rank (train.global_batch={B} over {world} ranks); pick a "
                            f"divisor of {b}.")
        return cls(B, world, micro, b // micro, cap, not t.micro_batch)

    def as_dict(self) -> dict:
        """config.json's resolved "batch" block."""
        return {"global_batch": self.global_batch, "world_size": self.world,
                "per_rank": self.micro * self.accum, "micro_batch": self.micro,
                "accum_steps": self.accum, "micro_auto": self.micro_auto,
                "max_micro_tokens": self.micro_cap}

    def describe(self) -> str:
        """The start-of-run line."""
        how = ("train.micro_batch" if not self.micro_auto else
               f"chosen: at most {self.micro_cap:,} tokens per pass, train.max_micro_tokens"
               if self.micro_cap > 0 else "chosen: no cap, train.max_micro_tokens=-1")
        return (f"micro batch {self.micro} x {self.accum} accumulation step(s) x {self.world} "
                f"rank(s) = global batch {self.global_batch} ({how})")
