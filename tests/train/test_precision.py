"""The precision policy (docs/training.md, "Precision"): LSTM layers run in fp32 outside any
autocast they did not choose, NT-ASGD keeps its mean in fp32 under DeepSpeed bf16, DeepSpeed
accumulates bf16 gradients in fp32, TF32 is a switch, NCCL is refused for two ranks on a GPU."""

from __future__ import annotations

import torch

from helpers.cli import TRAIN_ENTRY, run_ok, torchrun
from helpers.runs import one_thread  # noqa: F401  (autouse: tiny models, one thread)

from dist_lm.config import Config, ModelConfig
from dist_lm.distributed import nccl_refusal, set_tf32
from dist_lm.models import build_model
from dist_lm.models.lstm import WeightDropRNN
from dist_lm.train.engines import deepspeed_config

def spy_runs(layer: WeightDropRNN) -> list[tuple[bool, torch.dtype, torch.dtype]]:
    """(autocast on?, input dtype, weight dtype used) for every call of the layer's kernel."""
    calls, inner = [], layer._run

    def spy(x, hidden, cast):
        w = layer.weight_ih_l0.float() if cast else layer.weight_ih_l0
        calls.append((torch.is_autocast_enabled(x.device.type), x.dtype, w.dtype))
        return inner(x, hidden, cast)

    layer._run = spy
    return calls


def test_lstm_layer_never_runs_under_an_autocast_it_did_not_choose():
    torch.manual_seed(0)
    layer = WeightDropRNN(8, 12, wdrop=0.3).eval()
    x = torch.randn(5, 3, 8)
    h = layer.init_hidden(3)
    plain, _ = layer(x, h)
    calls = spy_runs(layer)
    with torch.autocast("cpu", torch.bfloat16):
        out, (hn, cn) = layer(x, h)
    assert calls == [(False, torch.float32, torch.float32)]
    assert out.dtype == torch.float32 and hn.dtype == torch.float32
    assert torch.equal(out, plain)  # the same fp32 computation as without autocast


def test_lstm_with_bf16_parameters_computes_in_fp32():
    """DeepSpeed's bf16 mode makes the parameters bf16; the layer still computes in fp32 and
    hands back the output in the input's dtype, the carry in fp32."""
    torch.manual_seed(0)
    layer = WeightDropRNN(8, 12).to(torch.bfloat16).eval()
    calls = spy_runs(layer)
    x = torch.randn(5, 3, 8, dtype=torch.bfloat16)
    out, (hn, cn) = layer(x, layer.init_hidden(3))
    assert calls == [(False, torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16 and hn.dtype == cn.dtype == torch.float32
    ref = WeightDropRNN(8, 12).eval()
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    want, _ = ref(x.float(), ref.init_hidden(3))
    torch.testing.assert_close(out.float(), want, rtol=0, atol=1e-2)  # one bf16 rounding of out


def test_model_under_autocast_keeps_its_lstm_layers_out_of_it():
    torch.manual_seed(0)
    model = build_model(ModelConfig(emb_size=8, hidden_size=12, n_layers=2), 30).train()
    spies = [spy_runs(m) for m in model.modules() if isinstance(m, WeightDropRNN)]
    x = torch.randint(0, 30, (6, 2))
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x, model.init_hidden(2), x)
    assert len(spies) == 2 and all(s == [(False, torch.float32, torch.float32)] for s in spies)
    assert out.nll.dtype == torch.float32 and torch.isfinite(out.nll).all()


def test_deepspeed_bf16_accumulates_in_fp32_and_averages_in_fp32(tmp_path, ptb_slice):
    cfg = Config()
    cfg.train.bf16 = True
    # ZeRO 0 takes no other accumulation dtype than the model's (tests/train/test_deepspeed_bf16.py)
    assert "data_types" not in deepspeed_config(cfg, world_size=2, micro=1, accum=2)
    cfg.dist.zero_stage = 1
    ds = deepspeed_config(cfg, world_size=2, micro=1, accum=2)
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert "data_types" not in deepspeed_config(Config(), world_size=2, micro=1, accum=2)
    # a real DeepSpeed bf16 run on CPU (gloo, ZeRO-1) averaging from the first step
    rd = tmp_path / "run"
    run_ok([*torchrun(2), str(TRAIN_ENTRY), str(tmp_path / "out"), f"data.shards={ptb_slice}",
            f"train.run_dir={rd}", "dist.engine=deepspeed", "dist.zero_stage=1",
            "train.bf16=true", "train.finetune=true", "train.max_steps=6",
            "train.micro_batch=1"])
    ck = rd / "checkpoints" / "step-00000006"
    avg = torch.load(ck / "averaged.pt", weights_only=True)
    live = torch.load(ck / "model.pt", weights_only=True)
    name = "rnns.0.weight_hh_l0_raw"
    assert live[name].dtype == torch.bfloat16  # DeepSpeed's bf16 parameters
    assert avg[name].dtype == torch.float32  # the NT-ASGD mean is fp32
    # the mean of 5 bf16 iterates (steps 2..6) is in general not itself a bf16 number
    assert any(not torch.equal(a, a.to(torch.bfloat16).float()) for a in avg.values())


def test_tf32_is_a_switch_for_cuda_devices_only():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        set_tf32(torch.device("cpu"), True)
        assert not torch.backends.cuda.matmul.allow_tf32  # the CPU has no TF32: untouched
        set_tf32(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(torch.device("cuda", 0), False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert Config().train.tf32  # on by default, and recorded in config.json like every key


def test_nccl_refuses_more_ranks_than_gpus_naming_gloo():
    assert nccl_refusal(2, 2) is None and nccl_refusal(1, 8) is None
    why = nccl_refusal(2, 1)
    assert "--dist.backend=gloo" in why and "2 ranks" in why and "1 GPU" in why


def test_compile_traces_around_the_lstm_and_once_for_every_bptt_length(tmp_path, ptb_slice):
    """train.compile: the Trainer's model is torch.compile'd with dynamic shapes; the LSTM
    kernel is never traced (it would be unrolled per timestep) and windows of other lengths
    compile nothing new. A recording backend (no code generation) stands in for inductor, whose
    C++ build takes minutes on this CPU; dynamo's tracing and guards are the real ones."""
    import torch._dynamo
    from helpers.config import tiny_config
    from helpers.runs import make_trainer

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    tr = make_trainer(tiny_config(tmp_path, ptb_slice, **{"train.compile": True,
                                                          "train.max_steps": 14,
                                                          "train.variable_bptt": True}))
    assert tr.engine.model is not tr.module  # the compiled wrapper
    tr.engine.model = torch.compile(tr.module, backend=record, dynamic=True)
    seen, inner = [], tr.train_step

    def spy(inputs, targets):
        n = len(graphs)
        out = inner(inputs, targets)
        seen.append((inputs.shape[0], len(graphs) - n))
        return out

    tr.train_step = spy
    tr.fit()
    # the first windows may specialise once (a layer of another shape, a slice offset that
    # happened to equal the batch); after them, no window length compiles anything new
    later = seen[3:]
    assert len({t for t, _ in later}) >= 3 and all(new == 0 for _, new in later), seen
    ops = {str(n.target) for g in graphs for n in g.graph.nodes}
    assert not any("lstm" in op.lower() for op in ops), ops
    torch._dynamo.reset()
