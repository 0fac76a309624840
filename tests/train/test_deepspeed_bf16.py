"""DeepSpeed in bf16 at ZeRO 0, 1 and 2, with SGD (a client optimizer) and with Adam (DeepSpeed's
own): each initialises through the real `deepspeed.initialize` on CPU/gloo and trains two steps
of two accumulated micro-batches on the real model and shards, with gradients accumulated in
fp32 where DeepSpeed allows it (ZeRO 1 and 2) and in bf16 at ZeRO 0 (its only choice there).

All six runs share one subprocess (one DeepSpeed import, one process group of one):

    python tests/train/test_deepspeed_bf16.py OUT.json SHARDS TMP
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: tests/ importable for the helpers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.cli import run_ok  # noqa: E402

pytestmark = pytest.mark.slow
STAGES, OPTIMS = (0, 1, 2), ("momentum", "adam")


def _one(shards: str, run_dir: Path, stage: int, optim: str) -> dict:
    import torch

    from helpers.config import tiny_config
    from helpers.runs import make_trainer

    cfg = tiny_config(run_dir, shards, **{"dist.engine": "deepspeed", "dist.zero_stage": stage,
                                          "train.bf16": True, "optim.name": optim,
                                          "optim.lr": 0.01 if optim == "adam" else 0.3,
                                          "train.max_steps": 2, "train.micro_batch": 2})
    try:
        tr = make_trainer(cfg)
        before = {k: v.float().clone() for k, v in tr.module.state_dict().items()}
        final = tr.fit()
    except Exception as exc:  # the test reports what each combination raised
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "written": run_dir.exists()}
    after = tr.module.state_dict()
    model_dtype, accum_dtype = tr.engine.model.get_data_types()
    return {"step": final["step"], "accum": tr.accum,
            "changed": sum(not torch.equal(before[k], v.float()) for k, v in after.items()),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "model_dtype": str(model_dtype), "accum_dtype": str(accum_dtype),
            "param_dtype": str(next(tr.module.parameters()).dtype)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ptb_slice) -> dict:
    tmp = tmp_path_factory.mktemp("ds-bf16")
    out = tmp / "out.json"
    run_ok([sys.executable, __file__, str(out), str(ptb_slice), str(tmp)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_bf16_initialises_and_steps(runs, stage, optim):
    r = runs[f"{stage}-{optim}"]
    assert "error" not in r, r
    assert r["step"] == 2 and r["accum"] == 2 and r["finite"] and r["changed"] > 0, r
    assert r["model_dtype"] == r["param_dtype"] == "torch.bfloat16", r
    # ZeRO 1 and 2 accumulate micro-batch gradients in fp32; ZeRO 0 only can in bf16
    assert r["accum_dtype"] == ("torch.bfloat16" if stage == 0 else "torch.float32"), r


if __name__ == "__main__":
    out_path, shards, tmp_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    import torch

    torch.set_num_threads(1)
    results = {f"{s}-{o}": _one(shards, tmp_dir / f"run-{s}-{o}", s, o)
               for s in STAGES for o in OPTIMS}
    Path(out_path).write_text(json.dumps(results))
