"""Engines: local (one device), DDP (torchrun) and DeepSpeed, behind one small interface.

The Trainer only ever calls:

    engine.model                  # what to call forward on (wrapped for DDP / DeepSpeed)
    engine.module                 # the unwrapped RNNLanguageModel (state_dict, eval, init_hidden)
    engine.set_lr(lr)             # this step's learning rate into every param group
    engine.backward(loss, last)   # one micro-batch; `loss` is the mean over this rank's micro-batch
    engine.step(clip) -> norm     # all-reduce (DDP/DS), clip over all parameters, optimizer step;
                                  # the norm may be a 0-dim device tensor (no host sync per step)
    engine.clip(clip) -> norm     # local/DDP (can_skip): the step in two halves, so the Trainer
    engine.apply() / engine.skip()  # can leave out a non-finite step without touching any state
    engine.device_skip_ready()    # ... or leave it out on the device, without a host sync:
    engine.apply_unless(flag)     #   the optimizer step with GradScaler's found_inf
    engine.save(step_dir) / engine.load(step_dir)   # optimizer state (the model is saved by the trainer)

Loss normalisation: each rank's micro-batch loss is its mean over m streams; local and DDP
scale it by 1/accum before backward, DDP averages over the W ranks, DeepSpeed does both
itself -- so every engine optimises the mean over all B = W * accum * m streams, and one
rank with B streams matches W ranks with B / W streams each.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path

import torch

from .. import distributed as D
from ..config import Config
from ..errors import UserError
from ..run.files import load_tensor_file, save_file
from .optim import build_optimizer

# tests: "device" makes the Trainer leave non-finite steps out on the device (fused optimizer,
# no host sync per step) on any device, "host" keeps the per-step agreement even on CUDA
STEP_SKIP_ENV = "DIST_LM_STEP_SKIP"


class LocalEngine:
    name = "local"

    def __init__(self, module: torch.nn.Module, cfg: Config, accum: int):
        self.module = module
        self.model = module
        self.accum = accum
        # fused optimizers on CUDA, and wherever the device-side skip is forced (tests, on CPU)
        fused = (os.environ.get(STEP_SKIP_ENV) == "device"
                 or all(p.is_cuda for p in module.parameters()))
        self.optimizer = build_optimizer(module.parameters(), cfg.optim, fused=fused)
        self.optim_file = "optim.pt"

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def _sync_context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        with self._sync_context(last):
            (loss / self.accum).backward()

    can_skip = True

    def clip(self, clip: float) -> torch.Tensor:
        """The gradient norm over every parameter (the softmax head's included), clipped to
        `clip` when > 0; a 0-dim device tensor."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))

    def apply(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop this step's gradients: parameters and optimizer state stay as they are."""
        self.optimizer.zero_grad(set_to_none=True)

    def device_skip_ready(self) -> bool:
        """Whether `apply_unless` can leave a step out exactly as `skip` does: the optimizer is
        one of torch's fused ones (they read GradScaler's found_inf in the kernel, and keep
        parameters, moments, momentum and step counts as they were) and its state exists. Before
        the first applied step it does not: fused SGD would create momentum buffers it never
        fills (torch.empty_like) on a left-out first step, so that step goes the host's way."""
        opt = self.optimizer
        if opt.defaults.get("fused") is not True:
            return False
        if isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0 for g in opt.param_groups):
            return True  # plain SGD keeps no state
        return all(opt.state.get(p) for g in opt.param_groups for p in g["params"]
                   if p.grad is not None)

    def apply_unless(self, skip: torch.Tensor) -> None:
        """The optimizer step, left out on the device where `skip` (a 0-dim bool on the device)
        is set: no host sync. The found_inf protocol is the one torch.amp.GradScaler uses with
        the fused optimizers (an attribute the optimizer's step() reads)."""
        opt = self.optimizer
        opt.found_inf = skip.to(torch.float32)
        try:
            opt.step()
        finally:
            del opt.found_inf
        opt.zero_grad(set_to_none=True)

    def step(self, clip: float) -> torch.Tensor:
        norm = self.clip(clip)
        self.apply()
        return norm

    def save(self, step_dir: Path, rank: int) -> None:
        if rank == 0:
            save_file(self.optimizer.state_dict(), step_dir / self.optim_file)

    def load(self, step_dir: Path, rank: int) -> None:
        self.optimizer.load_state_dict(load_tensor_file(step_dir / self.optim_file))


class DDPEngine(LocalEngine):
    """torch DistributedDataParallel; gradients are averaged over ranks on the last micro-batch."""

    name = "ddp"

    def __init__(self, module: torch.nn.Module, cfg: Config, accum: int, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(module, cfg, accum)
        ids = [device.index] if device.type == "cuda" else None
        # no per-forward buffer broadcast: the only buffer (the adaptive head's cutoffs) is built
        # from the config, equal on every rank; torch >= 2.13 names the flag forward_sync_buffers
        # (broadcast_buffers is deprecated there), older torch only knows broadcast_buffers
        flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else "broadcast_buffers")
        # gradient_as_bucket_view: .grad are views of the all-reduce buckets (no copy per step)
        self.model = DDP(module, device_ids=ids, gradient_as_bucket_view=True, **{flag: False})

    def _sync_context(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()


def deepspeed_config(cfg: Config, world_size: int, micro: int, accum: int) -> dict:
    """ds_config generated from the project config (there is no second, hand-kept copy).

    The schedule is not a DeepSpeed scheduler: AWD-LSTM scales every step's lr by
    seq_len / bptt, so the Trainer writes the lr into the param groups each step, exactly
    as it does for the other engines (and NT-ASGD averaging lives in the Trainer too).
    """
    o = cfg.optim
    ds: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(o.clip),
        "zero_optimization": {"stage": int(cfg.dist.zero_stage)},
        "bf16": {"enabled": bool(cfg.train.bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # SGD and the other client optimizers are not on DeepSpeed's tested list for ZeRO
        "zero_allow_untested_optimizer": True,
    }
    if cfg.train.bf16 and cfg.dist.zero_stage > 0:
        # bf16 parameters; where micro-batch gradients accumulate (DeepSpeed 0.19):
        #   ZeRO 1: grad_accum_dtype fp32 selects its BF16_Optimizer, fp32 accumulation buffers
        #           and fp32 master weights;
        #   ZeRO 2: its ZeRO optimizer accumulates into fp32 partitions (fp32 master weights);
        #   ZeRO 0: no ZeRO optimizer: DeepSpeed only takes grad_accum_dtype = the model dtype
        #           there (any other mix raises NotImplementedError at initialize), so its
        #           fp16-style wrapper keeps fp32 master weights but accumulates and all-reduces
        #           the gradients in bf16 (the trainer says so when there is more than one
        #           micro-batch to accumulate).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if o.name in ("adam", "adamw"):
        ds["optimizer"] = {"type": "AdamW" if o.name == "adamw" else "Adam",
                           "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                      "weight_decay": o.weight_decay, "torch_adam": True,
                                      "adam_w_mode": o.name == "adamw"}}
    return ds


def _disable_deepspeed_shm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at init.

    deepspeed.comm's TorchBackend calls build_shm_op() unconditionally, which compiles
    csrc/cpu/comm/shm*.cpp with the host compiler whenever the op probes as compatible:
    ~30 s per process on first use, and a crash on machines without a compiler. We talk
    over torch.distributed (gloo) anyway, so we mark the op incompatible in DeepSpeed's
    own probe table (`deepspeed.ops.__compatible_ops__`, cached per process so the edit
    persists); build_shm_op() then returns None and init takes about a second.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """deepspeed.initialize on an already initialised torch.distributed group."""

    name = "deepspeed"

    def __init__(self, module: torch.nn.Module, cfg: Config, accum: int, micro: int,
                 world_size: int, device: torch.device):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
            raise UserError(f"dist.engine=deepspeed needs the deepspeed package ({exc}); "
                            f"pip install deepspeed or use dist.engine=ddp.") from None
        _disable_deepspeed_shm_build()
        self.module = module
        self.accum = accum
        self.ds_config = deepspeed_config(cfg, world_size, micro, accum)
        client_opt = None
        if "optimizer" not in self.ds_config:
            client_opt = build_optimizer(module.parameters(), cfg.optim)
        # The process group is already up (gloo/nccl via dist_lm.distributed), so DeepSpeed
        # must not initialise its own.
        if cfg.train.bf16 and cfg.dist.zero_stage == 0 and accum > 1 and D.get_rank() == 0:
            print(f"dist-lm: DeepSpeed ZeRO 0 accumulates the {accum} micro-batches' gradients "
                  f"in bf16; --dist.zero_stage=1 accumulates them in fp32", flush=True)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters()],
            optimizer=client_opt, config=self.ds_config, dist_init_required=False)

    set_lr = LocalEngine.set_lr  # DeepSpeed's optimizer exposes the same param_groups
    can_skip = False  # its step() reduces, clips and steps as one; the Trainer stops instead

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.model.step()  # no-op apart from DeepSpeed's micro-step bookkeeping

    def step(self, clip: float) -> torch.Tensor | float:
        self.model.step()  # reduce, clip (gradient_clipping), optimizer step, zero grads
        norm = self.model.get_global_grad_norm()  # a tensor or a float; no host sync here
        return norm if norm is not None else float("nan")

    def save(self, step_dir: Path, rank: int) -> None:
        # collective: every rank writes its ZeRO partition under step_dir/deepspeed/
        self.model.save_checkpoint(str(step_dir), tag="deepspeed", save_latest=False)

    def load(self, step_dir: Path, rank: int) -> None:
        path, _ = self.model.load_checkpoint(str(step_dir), tag="deepspeed",
                                             load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"checkpoint {step_dir} has no DeepSpeed state (deepspeed/); it was "
                            f"written by another engine. Resume with the same dist.engine.")


def build_engine(module: torch.nn.Module, cfg: Config, device: torch.device, world_size: int,
                 accum: int, micro: int):
    engine = cfg.dist.engine
    if engine == "local":
        if world_size > 1:
            raise UserError(f"dist.engine=local runs one process but the launcher started "
                            f"{world_size}; set --dist.engine=ddp (or deepspeed).")
        return LocalEngine(module, cfg, accum)
    if engine == "ddp":
        return DDPEngine(module, cfg, accum, device)
    return DeepSpeedEngine(module, cfg, accum, micro, world_size, device)
