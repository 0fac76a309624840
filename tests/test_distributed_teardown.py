"""The collective helpers return a CPU tensor only once gloo's worker thread has let go of it.

Without the wait, about one all-reduce in five returned while the worker still held the
tensor (use count 4: its work and future). A process that ended in that moment dropped the
last reference in the worker after Python had begun to shut down, and aborted ("terminate
called without an active exception"): rank 1 of a 2-rank `dist-lm eval`, which exits right
after its one all-reduce (tests/eval/test_eval_protocol.py::test_two_ranks_equal_one_process)."""

from __future__ import annotations

from helpers.cli import run_ok, torchrun

SCRIPT = """
import torch
from dist_lm.distributed import all_reduce_max, all_reduce_sum, init_distributed
init_distributed(torch.device("cpu"), "gloo")
held = 0
for i in range(200):
    t = torch.tensor([1.0, float(i)], dtype=torch.float64)
    (all_reduce_sum if i % 2 else all_reduce_max)(t)
    held += t._use_count() > 1
# one file per rank: the two ranks' prints would share torchrun's stdout and interleave
open(f"held-{torch.distributed.get_rank()}.txt", "w").write(str(held))
torch.distributed.destroy_process_group()
"""


def test_reduced_tensors_are_released_before_the_helpers_return(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(SCRIPT)
    run_ok([*torchrun(2), str(script)], cwd=tmp_path, timeout=240)
    held = [(tmp_path / f"held-{r}.txt").read_text() for r in (0, 1)]
    assert held == ["0", "0"], held  # tensors each rank got back while gloo still held them
