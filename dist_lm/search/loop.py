"""The search: shared-weight training alternating with controller training, then derive.

    dist-lm search configs/ptb_small_cpu.toml --search.n_nodes=8 --train.run_dir=runs/search
    dist-lm search ... --random                 # random-search baseline, same budget

A search of R rounds takes R * (search.shared_steps + search.controller_steps) steps, counted
by one step counter (so a checkpoint can fall anywhere):

- a shared step samples a cell (from the controller, or uniformly with --random), runs the
  supernet on the next training window (the same StreamLoader as `train`: variable BPTT, the
  hidden state carried and detached, reset at epoch ends) with the model's regularizers and
  AR/TAR, and takes one optimizer step (optim.*; lr scaled by seq_len / bptt, gradient clipping);
- a controller step samples a cell with its log-probability and entropy, scores it on the next
  validation window in eval mode (hidden carried over the validation stream), reward =
  search.reward_c / ppl, and takes one Adam step on
  -(reward - baseline) * log_prob - entropy_weight * entropy, with the baseline an exponential
  moving average of the rewards (updated first, as in ENAS; it starts at the first reward).
  With --random the cell is uniform and nothing is learned (the step still costs the same).

At the end (or at search.max_seconds) `derive` samples search.derive_samples cells, scores
each on validation with the shared weights, and writes the best as RUN/cell.toml: the resolved
config with model.arch = "cell" and model.cell = the genotype, ready for `dist-lm train`;
RUN/derive.json holds every score.

Checkpoints are the run directory's step directories (dist_lm.run: RUN/checkpoints/step-XXXXXXXX/
with its DONE marker and digests, written every checkpoint.every_steps or at the end of every
round, the newest checkpoint.keep_last kept): the search registers its pieces on the same
Checkpointer as `train` (the supernet in model.pt, its optimizer in optim.pt; the counters and
baseline, the controller and its optimizer in trainer.pt; both loaders' positions, the carried
hidden states and the generators, torch's, which draws the dropout masks, and the cell
sampler's, in rank-00000.pt). The run directory is opened like `train`'s (the lock, fresh /
resume / refuse / overwrite, the same refusals), and `--resume auto` continues bit-exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch

from ..config import Config, load_config, to_dict
from ..data.prepared import PreparedCorpus
from ..errors import Stopped, UserError
from ..fileio import write_text_atomic
from ..models import detach_hidden
from ..models.cell import Genotype, uniform_genotype
from ..run.checkpointer import Checkpointer, RNGState
from ..run.directory import open_run
from ..run.layout import list_checkpoints
from ..run.stop import StopSignals
from ..train.faults import KILL_ENV
from .controller import Controller
from .supernet import build_supernet, set_cell


def search_command(config: str, resume: str | None = None, overwrite: bool = False,
                   random: bool = False, overrides: dict | None = None) -> dict:
    over = dict(overrides or {})
    if random:
        over["search.random"] = True
    cfg = load_config(config, over)
    return Search(cfg, base_config=config).run(resume=resume, overwrite=overwrite)


def _to(h, device):
    if h is None or isinstance(h, torch.Tensor):
        return None if h is None else h.to(device)
    return type(h)(_to(x, device) for x in h)


class _Carried:
    """The search's carried hidden states (training and validation streams) as a Stateful
    piece of the rank file."""

    def __init__(self, search: "Search"):
        self.search = search

    def state_dict(self) -> dict:
        return {"hidden": self.search.hidden, "valid_hidden": self.search.valid_hidden}

    def load_state_dict(self, sd: dict) -> None:
        self.search.hidden = _to(sd["hidden"], self.search.device)
        self.search.valid_hidden = _to(sd["valid_hidden"], self.search.device)


class Search:
    def __init__(self, cfg: Config, base_config: str | None = None):
        from ..distributed import pick_device
        from ..train.engines import LocalEngine

        s, t = cfg.search, cfg.train  # search.* values: checked by config.validate
        if cfg.dist.engine != "local":
            raise UserError(f"dist-lm search runs on one device (dist.engine=local); got "
                            f"dist.engine={cfg.dist.engine}. Train the found cell with any "
                            f"engine afterwards.")
        self.cfg, self.base_config = cfg, base_config
        self.device = pick_device(t.device)
        corpus = PreparedCorpus.open(cfg.shards_dir(), cfg.data.corpus,
                                     shard_url=cfg.data.shard_url, device=self.device)
        self.corpus_dir, self.vocab_size = corpus.dir, corpus.vocab_size

        def loader(split, batch, variable):
            return corpus.loader(split, batch, t.bptt, variable=variable, seed=t.seed,
                                 max_seq_len=t.max_seq_len)

        self.make_loader = loader
        self.train_loader = loader(cfg.data.train_split, t.global_batch, t.variable_bptt)
        self.valid_loader = loader(cfg.data.valid_split, cfg.data.eval_batch_size, False)
        for ld in (self.train_loader, self.valid_loader):
            ld.check()

        torch.manual_seed(t.seed)
        self.model = build_supernet(cfg.model, self.vocab_size, s.n_nodes).to(self.device)
        self.engine = LocalEngine(self.model, cfg, accum=1)
        self.controller = Controller(s.n_nodes, s.controller_hidden, s.temperature,
                                     s.tanh_constant)
        self.controller_optim = torch.optim.Adam(self.controller.parameters(),
                                                 lr=s.controller_lr)
        self.cells = torch.Generator().manual_seed(t.seed + 7919)  # the cell sampler's
        self.step, self.elapsed, self.baseline = 0, 0.0, None
        self.hidden = self.valid_hidden = None
        self._train_it = self._valid_it = None
        self.sink = None
        self._signal = 0
        self.last_saved = -1
        self.checkpointer = Checkpointer(
            Path(t.run_dir), 0, model=self.model, engine=self.engine,
            shared={"search": self, "controller": self.controller,
                    "controller_optim": self.controller_optim},
            per_rank={"train_loader": self.train_loader, "valid_loader": self.valid_loader,
                      "hidden": _Carried(self), "rng": RNGState(self.device, cells=self.cells)},
            meta={"world_size": 1, "global_batch": t.global_batch, "engine": "local"})

    # ---- the schedule --------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        s = self.cfg.search
        return s.rounds * (s.shared_steps + s.controller_steps)

    def phase(self, step: int) -> str:
        s = self.cfg.search
        return "shared" if step % (s.shared_steps + s.controller_steps) < s.shared_steps \
            else "controller"

    def end_of_round(self, step: int) -> bool:
        s = self.cfg.search
        return step % (s.shared_steps + s.controller_steps) == 0

    # ---- the two kinds of step -----------------------------------------------------------

    def sample_cell(self) -> Genotype:
        if self.cfg.search.random:
            return uniform_genotype(self.cfg.search.n_nodes, self.cells)
        with torch.no_grad():
            return self.controller.sample(self.cells)[0]

    def _next(self, which: str):
        """The next window of the train or valid stream; a new epoch resets its hidden."""
        loader = self.train_loader if which == "train" else self.valid_loader
        it = getattr(self, f"_{which}_it")
        for _ in range(2):
            if it is None:
                it = iter(loader)
                setattr(self, f"_{which}_it", it)
            try:
                return next(it)
            except StopIteration:
                it = None
                setattr(self, f"_{which}_it", None)
                if which == "train":
                    self.hidden = None
                else:
                    self.valid_hidden = None
        raise UserError(f"the {which} split yields no window; lower train.bptt.")

    def shared_step(self) -> dict:
        cfg = self.cfg
        g = self.sample_cell()
        inputs, targets = self._next("train")
        seq_len = inputs.shape[0]
        lr = cfg.optim.lr * seq_len / cfg.train.bptt
        self.engine.set_lr(lr)
        set_cell(self.model, g)
        self.model.train()
        if self.hidden is None:
            self.hidden = self.model.init_hidden(inputs.shape[1])
        out = self.model(inputs, self.hidden, targets)
        nll = out.nll.float().mean()
        loss = nll + out.ar + out.tar
        self.engine.backward(loss, last=True)
        gnorm = self.engine.clip(cfg.optim.clip)
        rec = {"phase": "shared", "cell": str(g), "lr": lr, "seq_len": seq_len}
        if not (torch.isfinite(gnorm) and torch.isfinite(loss)):
            self.engine.skip()  # a cell that diverged: nothing applied, the hidden restarts
            self.hidden = None
            return {**rec, "event": "non-finite"}
        self.engine.apply()
        self.hidden = detach_hidden(out.hidden)
        loss_v = float(nll.detach())
        return {**rec, "loss": loss_v, "ppl": math.exp(min(loss_v, 50.0)),
                "grad_norm": float(gnorm)}

    @torch.no_grad()
    def valid_reward(self, g: Genotype) -> tuple[float, float]:
        """(reward, ppl) of a cell on the next validation window, hidden carried."""
        inputs, targets = self._next("valid")
        set_cell(self.model, g)
        self.model.eval()
        if self.valid_hidden is None:
            self.valid_hidden = self.model.init_hidden(inputs.shape[1])
        out = self.model(inputs, self.valid_hidden, targets)
        self.valid_hidden = detach_hidden(out.hidden)
        nll = float(out.nll.float().mean())
        if not math.isfinite(nll):
            self.valid_hidden = None
            return 0.0, math.inf
        ppl = math.exp(min(nll, 50.0))
        return self.cfg.search.reward_c / ppl, ppl

    def controller_step(self, reward_fn=None) -> dict:
        """One REINFORCE step; reward_fn(genotype) -> float replaces the validation reward
        (tests)."""
        s = self.cfg.search
        if s.random:
            g = uniform_genotype(s.n_nodes, self.cells)
            reward, ppl = (reward_fn(g), None) if reward_fn else self.valid_reward(g)
            return {"phase": "controller", "cell": str(g), "reward": reward, "valid_ppl": ppl}
        self.controller.train()
        g, log_prob, entropy = self.controller.sample(self.cells)
        reward, ppl = (reward_fn(g), None) if reward_fn else self.valid_reward(g)
        if self.baseline is None:
            self.baseline = reward
        else:
            self.baseline -= (1 - s.baseline_decay) * (self.baseline - reward)
        loss = -(reward - self.baseline) * log_prob - s.entropy_weight * entropy
        self.controller_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.controller_optim.step()
        return {"phase": "controller", "cell": str(g), "reward": reward, "valid_ppl": ppl,
                "baseline": self.baseline, "log_prob": float(log_prob.detach()),
                "entropy": float(entropy.detach())}

    def one_step(self) -> dict:
        rec = self.shared_step() if self.phase(self.step) == "shared" else self.controller_step()
        self.step += 1
        return {"step": self.step, **rec}

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The search's own counters (the "search" piece of trainer.pt); search.n_nodes and
        search.random are checked on resume (_check_resume), not loaded."""
        s = self.cfg.search
        return {"n_nodes": s.n_nodes, "random": s.random, "step": self.step,
                "elapsed": self.elapsed, "baseline": self.baseline}

    def load_state_dict(self, st: dict) -> None:
        self.step, self.elapsed = int(st["step"]), float(st["elapsed"])
        self.baseline = None if st["baseline"] is None else float(st["baseline"])
        self._train_it = self._valid_it = None  # the loaders continue at their loaded positions

    def _check_resume(self, start: Path) -> None:
        """Refuse a checkpoint of another search space or kind (before anything is written)."""
        st = self.checkpointer.read_shared(start)["search"]
        s = self.cfg.search
        for key, mine in (("n_nodes", s.n_nodes), ("random", s.random)):
            if st.get(key) != mine:
                raise UserError(f"this search checkpoint was written with search.{key}="
                                f"{st.get(key)!r}, this run has {mine!r}; resume with the same "
                                f"setting, or start afresh with --overwrite.")

    def checkpoints(self) -> list[Path]:
        """The complete step directories of this search, oldest first."""
        return list_checkpoints(self.cfg.train.run_dir)

    def save(self) -> Path:
        path = self.checkpointer.save(self.step, averaged=None, best_step=-1,
                                      keep_last=self.cfg.checkpoint.keep_last)
        self.last_saved = self.step
        return path

    # ---- derive --------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, g: Genotype, windows: int = 0) -> float:
        """Validation perplexity of a cell with the shared weights: the first `windows`
        windows of the split (0: all of it), hidden from zero and carried."""
        set_cell(self.model, g)
        self.model.eval()
        loader = self.make_loader(self.cfg.data.valid_split, self.cfg.data.eval_batch_size, False)
        total, count, hidden = 0.0, 0, None
        try:
            for i, (inputs, targets) in enumerate(loader):
                if windows and i >= windows:
                    break
                if hidden is None:
                    hidden = self.model.init_hidden(inputs.shape[1])
                out = self.model(inputs, hidden, targets)
                hidden = detach_hidden(out.hidden)
                total += float(out.nll.double().sum())
                count += out.nll.numel()
        finally:
            loader.close()
        nll = total / max(1, count)
        return math.exp(min(nll, 50.0)) if math.isfinite(nll) else math.inf

    def derive(self) -> tuple[Genotype, list[dict]]:
        """Sample search.derive_samples cells (controller, or uniform with search.random) and
        keep the one with the lowest validation perplexity on the shared weights."""
        s = self.cfg.search
        table = []
        for _ in range(s.derive_samples):
            g = self.sample_cell()
            table.append({"cell": str(g), "valid_ppl": self.score(g, s.derive_windows)})
        best = min(table, key=lambda r: r["valid_ppl"])
        from ..models.cell import parse_genotype

        return parse_genotype(best["cell"]), table

    def write_cell_config(self, g: Genotype, ppl: float) -> Path:
        from ..sweep.space import dump_toml

        run_dir = Path(self.cfg.train.run_dir)
        flat = {}
        for section, values in to_dict(self.cfg).items():
            if section == "search":
                continue
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        flat["model.arch"], flat["model.cell"] = "cell", str(g)
        flat["train.run_dir"] = str(run_dir) + "-cell"
        kind = "random search" if self.cfg.search.random else "ENAS search"
        header = (f"A cell found by `dist-lm search` ({kind}) in {run_dir}: validation ppl "
                  f"{ppl:.2f} with the shared weights after {self.step} search steps.\n"
                  f"Base recipe: {self.base_config or '(defaults)'}; train it from scratch with\n"
                  f"  dist-lm train {run_dir / 'cell.toml'}")
        path = run_dir / "cell.toml"
        write_text_atomic(path, dump_toml(flat, header))
        return path

    # ---- the loop ------------------------------------------------------------------------

    def _open(self, resume: str | None, overwrite: bool) -> Path | None:
        """Open the run directory as `train` does (run.directory.open_run) and load the
        checkpoint it continues from, if any."""
        self.lock, start = open_run(Path(self.cfg.train.run_dir), self.cfg, self.corpus_dir,
                                    resume, overwrite, check=self._check_resume)
        if start is not None:
            try:
                self.checkpointer.load(start, self.checkpointer.read_shared(start))
            except BaseException:
                self.lock.release()
                raise
        return start

    def _on_signal(self, signum: int) -> None:
        self._signal = signum

    def run(self, resume: str | None = None, overwrite: bool = False,
            stop_at: int = 0) -> dict:
        """Search until total_steps (or search.max_seconds), then derive; `stop_at` > 0 stops
        after that step with a checkpoint and no derive (tests: an interrupted search)."""
        from ..metrics.writer import MetricsSink

        cfg = self.cfg
        start = self._open(resume, overwrite)
        self.last_saved = self.step if start is not None else -1
        kill_at = int(os.environ.get(KILL_ENV, "0"))  # fault injection (tests), as in `train`
        self.sink = MetricsSink(cfg.train.run_dir, cfg, total_steps=self.total_steps,
                                initial_step=self.step,
                                resume_step=None if start is None else self.step)
        if start is not None:
            print(f"dist-lm: search resumed from {start} (step {self.step})", flush=True)
        stops = StopSignals(self._on_signal).install()  # SIGTERM / SIGINT: stop resumably
        t0, e0 = time.perf_counter(), self.elapsed
        every = cfg.checkpoint.every_steps
        try:
            while self.step < self.total_steps:
                if cfg.search.max_seconds and self.elapsed >= cfg.search.max_seconds:
                    break
                rec = self.one_step()
                self.elapsed = e0 + time.perf_counter() - t0
                self.sink.progress(1)
                if self.step % max(1, cfg.log.every_steps) == 0 or rec.get("event"):
                    self.sink.log({**rec, "elapsed_s": self.elapsed})
                if (every and self.step % every == 0) or (not every and self.end_of_round(
                        self.step)):
                    self.save()
                if kill_at and self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if self._signal or (stop_at and self.step >= stop_at):
                    if self.last_saved != self.step:
                        self.save()
                    if self._signal:
                        raise Stopped(f"search stopped by {signal.Signals(self._signal).name} at "
                                      f"step {self.step}; continue with --resume auto")
                    return {"step": self.step, "stopped": True}
            if self.last_saved != self.step:
                self.save()
            g, table = self.derive()
            ppl = min(r["valid_ppl"] for r in table)
            run_dir = Path(cfg.train.run_dir)
            write_text_atomic(run_dir / "derive.json", json.dumps(
                {"cell": str(g), "valid_ppl": ppl, "random": cfg.search.random,
                 "samples": table, "step": self.step}, indent=2) + "\n")
            path = self.write_cell_config(g, ppl)
            rec = {"step": self.step, "event": "derived", "cell": str(g), "valid_ppl": ppl,
                   "final": True, "elapsed_s": self.elapsed}
            self.sink.log(rec)
            self.sink.set_summary(cell=str(g), derived_valid_ppl=ppl)
            print(f"dist-lm: found cell \"{g}\" (valid ppl {ppl:.2f} with the shared weights); "
                  f"train it: dist-lm train {path}", flush=True)
            return {**rec, "config": str(path)}
        finally:
            stops.restore()
            self.train_loader.close()
            self.valid_loader.close()
            self.sink.close()
            self.lock.release()
