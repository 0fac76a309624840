"""The dist-lm command line (fire, a dict of commands; every command returns None).

    dist-lm prepare ptb                       # corpus -> shards/ptb (vocab, manifest, tar shards)
    dist-lm verify shards/ptb                 # check every shard against its manifest
    dist-lm train configs/cpu_smoke.toml --optim.lr=30
    torchrun --nproc_per_node 2 -m dist_lm train configs/ptb_awd_lstm.toml --dist.engine=ddp
    dist-lm eval runs/ptb --split test
    dist-lm generate runs/ptb --prompt "the market" --length 50
    dist-lm score runs/ptb sentences.txt
    dist-lm bench data --json bench.json
    dist-lm compare runs/a runs/b
    dist-lm sweep configs/sweeps/ptb_small_lr.toml --workers 2

Run `dist-lm COMMAND --help` for a command's options.
"""

from __future__ import annotations

import os
import sys

from .errors import Stopped, UserError


def prepare(corpus: str, out: str | None = None, data_dir: str | None = None,
            tokenizer: str | None = None, chunk_len: int = 65536,
            shard_tokens: int = 16_777_216, max_vocab: int = 0, min_freq: int = 0,
            bpe_vocab: int = 16384, download: bool = True) -> None:
    """Turn a corpus into WebDataset shards, vocab.json and manifest.json.

    Args:
      corpus: ptb, ptb-char, wikitext-2, wikitext-103, enwik8, text8, or text:DIR
        (a directory with train.txt, valid.txt and test.txt).
      out: output directory (default shards/CORPUS). Written under a temporary name
        and renamed at the end, so an interrupted prepare leaves nothing half-written.
      data_dir: directory holding the raw corpus files as DIR/<corpus>/<file> (default
        $DIST_LM_DATA_DIR, else ~/.cache/dist-lm/data); files missing there are downloaded
        from the official source ($DIST_LM_MIRROR replaces it) and checked by checksum.
      tokenizer: word, char, byte or bpe (default: the preset's own).
      chunk_len: tokens per WebDataset sample (64Ki keeps tar overhead small; readers
        take any size).
      shard_tokens: tokens per tar shard (rounded to whole chunks).
      max_vocab: keep the most frequent words only (word tokenizer; 0 keeps all).
      min_freq: drop words seen fewer times (word tokenizer; they become <unk>).
      bpe_vocab: vocabulary size for the bpe tokenizer.
      download: allow downloading missing files.
    """
    from .data.prepare import prepare_corpus

    prepare_corpus(corpus, out=out, data_dir=data_dir, tokenizer=tokenizer,
                   chunk_len=chunk_len, shard_tokens=shard_tokens, max_vocab=max_vocab,
                   min_freq=min_freq, bpe_vocab=bpe_vocab, download=download)


def verify(directory: str) -> None:
    """Check every shard of a prepared corpus against manifest.json (sha256, counts).

    Args:
      directory: a prepared corpus (holds manifest.json), e.g. shards/ptb.
    """
    from .data.shards import verify_corpus

    verify_corpus(directory)


def train(config: str, resume: str | None = None, overwrite: bool = False, **overrides) -> None:
    """Train a model. CONFIG is a TOML file; override any key as --section.key=value.

    A run directory holds one run: without --resume, one that already holds checkpoints or
    metrics is refused (--resume auto continues it, --overwrite starts it afresh).

    Args:
      config: TOML recipe, e.g. configs/cpu_smoke.toml.
      resume: 'auto' (latest complete checkpoint in train.run_dir; a fresh start when there
        is none) or a checkpoint directory.
      overwrite: delete the previous run's outputs in train.run_dir and start afresh.
      overrides: dotted config keys, e.g. --optim.lr=30 --train.run_dir=runs/x.
        `dist-lm train --help` lists them all below.
    """
    from .train.trainer import train_command

    train_command(config, resume=resume, overwrite=overwrite, overrides=overrides)


def eval(path: str, split: str = "test", protocol: str = "reference", batch_size: int = 0,
         **options) -> None:
    """Evaluate a run or checkpoint: perplexity (words) or bits per character.

    The result is printed and written to STEP_DIR/eval-SPLIT[-fast][-cache|-dynamic].json.
    More options (docs/evaluation.md):
      --cache, or --cache.window/--cache.theta/--cache.lambdah/--cache.normalize, and
        --cache.search (grid search of theta and lambdah on valid first);
      --dynamic, or --dynamic.lr/--dynamic.decay/--dynamic.eps/--dynamic.bptt/
        --dynamic.stat_batch/--dynamic.stat_batches, and --dynamic.search
        (+ --dynamic.search_tokens);
      --bptt (default train.bptt), --corpus DIR (default data.shards), --device,
      --averaged=false (final instead of averaged weights), --checkpoint best|latest|step-N
        (default best: the best validation's checkpoint).

    Args:
      path: run directory (its best checkpoint, see --checkpoint) or a step-XXXXXXXX directory.
      split: valid or test.
      protocol: reference (10 streams for valid, 1 for test, fixed bptt) or fast (batched).
      batch_size: streams; 0 uses the protocol's default.
      options: the options above.
    """
    from .eval.evaluate import eval_command

    eval_command(path, split=split, protocol=protocol, batch_size=batch_size, options=options)


def generate(path: str, prompt: str = "", length: int = 100, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, samples: int = 1) -> None:
    """Sample text from a trained model, from a prompt or from nothing.

    Args:
      path: run directory or checkpoint directory.
      prompt: text to condition on (tokenized with the run's vocabulary).
      length: tokens to generate.
      temperature: softmax temperature (> 0).
      top_k: keep the k most likely tokens (0 keeps all).
      top_p: nucleus sampling mass (1.0 keeps all).
      seed: random seed; the same seed gives the same text.
      samples: number of independent samples.
    """
    from .eval.generate import generate_command

    generate_command(path, prompt=prompt, length=length, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed, samples=samples)


def score(path: str, file: str, per: str = "line", out: str | None = None) -> None:
    """Per-token log-probabilities of a text file, as JSON lines.

    Args:
      path: run directory or checkpoint directory.
      file: text file to score ('-' reads standard input).
      per: 'line' scores each line on its own; 'text' scores the whole file as one stream.
      out: write JSON lines here instead of standard output.
    """
    from .eval.score import score_command

    score_command(path, file, per=per, out=out)


def bench(group: str = "all", json: str | None = None, quick: bool = False,
          dry: bool = False) -> None:
    """Measure speed in one process and print a table.

    Args:
      group: data, kernels, model, train, eval or all; or gpu (checks and figures for a GPU
        machine, under 8 minutes; exits non-zero when a check fails).
      json: also write each figure as {"name", "value", "unit", "baseline", "ratio"}.
      quick: smaller sizes (a smoke run of the benchmark code, not a measurement).
      dry: gpu only: every section at tiny sizes on the CPU (a rehearsal, no GPU needed).
    """
    from .bench import bench_command

    bench_command(group, json_path=json, quick=quick, dry=dry)


def compare(*runs: str, out: str | None = None, metric: str = "valid_ppl",
            x: str = "tokens") -> None:
    """Compare runs: one table of final/best metrics and throughput, plus plots.

    Args:
      runs: run directories.
      out: directory for the table (compare.md) and plots, one line per run:
        train_loss_vs_X.png and valid_ppl_vs_X.png (valid_bpc_vs_X.png for characters);
        default prints only.
      metric: the column to sort by.
      x: the plots' x-axis: tokens (training tokens: runs of different global batch or
        bptt compare at equal data), steps (optimizer steps) or seconds (wall clock).
    """
    from .metrics.compare import compare_command

    compare_command(list(runs), out=out, metric=metric, x=x)


def sweep(space: str, target: str | None = None, dir: str | None = None, workers: int = 0,
          trials: int = 0, storage: str | None = None, top: int = 10) -> None:
    """Tune hyperparameters with Optuna; every trial is a `dist-lm train` run (docs/tuning.md).

        dist-lm sweep configs/sweeps/ptb_small_lr.toml --dir sweeps/ptb-lr --workers 2
        dist-lm sweep report sweeps/ptb-lr      # report.md, best.toml, plots in that dir

    Run it again (or on more machines against one --storage) to continue the same study.

    Args:
      space: a study file ([study], [fixed], [space."KEY"], [[enqueue]]), or `report`.
      target: with `report`, the study directory.
      dir: the study directory (default sweeps/NAME): trials/N run dirs, logs, journal.
      workers: trials at once in this process (default study.workers).
      trials: total trials of the study (default study.trials).
      storage: journal file or SQLAlchemy URL (default study.storage, else DIR/study.journal).
      top: rows in the report's table of best trials.
    """
    from .sweep import sweep_command

    sweep_command(space, target, study_dir=dir, workers=workers, trials=trials,
                  storage=storage, top=top)


def search(config: str, resume: str | None = None, overwrite: bool = False,
           random: bool = False, **overrides) -> None:
    """Search a recurrent cell (ENAS): shared weights and a controller, then derive the best
    cell into RUN_DIR/cell.toml, a config for `dist-lm train` (docs/search.md).

    Args:
      config: TOML recipe (the base of the derived config), e.g. configs/ptb_small_cpu.toml.
      resume: 'auto' (the latest complete search checkpoint in train.run_dir; a fresh start
        when there is none) or a checkpoint directory.
      overwrite: delete the previous search's outputs in train.run_dir and start afresh.
      random: random-search baseline: cells sampled uniformly, same budget.
      overrides: dotted config keys, e.g. --search.n_nodes=8 --search.rounds=20.
    """
    from .search import search_command

    search_command(config, resume=resume, overwrite=overwrite, random=random,
                   overrides=overrides)


COMMANDS = {
    "prepare": prepare,
    "verify": verify,
    "train": train,
    "eval": eval,
    "generate": generate,
    "score": score,
    "bench": bench,
    "compare": compare,
    "sweep": sweep,
    "search": search,
}


HELP_FLAGS = ("--help", "-h")


def _help_requested(argv: list[str]) -> str | None:
    """The command whose help is asked for: `--help` or `-h` anywhere after a command's name.

    fire would otherwise take the tokens before --help as the command's arguments, call the
    command (every argument after the first has a default) and only then show help for what
    it returned: `dist-lm bench model --help` ran the benchmark first."""
    if argv and argv[0] in COMMANDS and any(tok in HELP_FLAGS for tok in argv[1:]):
        return argv[0]
    return None


def _stdin_file(argv: list[str]) -> list[str]:
    """`score RUN -` reads standard input, but fire takes a bare `-` as its own separator:
    hand it to fire as `--file=-` (a `-` after a flag without `=` is that flag's value)."""
    if not argv or argv[0] != "score":
        return argv
    out = argv[:1]
    for tok in argv[1:]:
        prev = out[-1]
        if tok != "-":
            out.append(tok)
        elif prev.startswith("--") and "=" not in prev and len(out) > 1:
            out[-1] = f"{prev}=-"
        else:
            out.append("--file=-")
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `dist-lm` console script and `python -m dist_lm`."""
    import fire

    from .allocator import keep_freed_memory

    argv = _stdin_file(list(sys.argv[1:] if argv is None else argv))
    keep_freed_memory()  # a step's big host tensors reuse freed memory (dist_lm/allocator.py)
    help_for = _help_requested(argv)
    if help_for and help_for != "train":  # that command's help, as `dist-lm CMD --help`
        argv = [help_for, "--help"]
    try:
        if help_for == "train":
            from .config import help_text

            print(train.__doc__)
            print("Config keys (defaults shown):\n" + help_text())
        else:
            fire.Fire(COMMANDS, command=argv, name="dist-lm")
        sys.stdout.flush()  # a closed pipe raises here, not in the interpreter's last flush
    except BrokenPipeError:
        # The reader closed stdout early (`dist-lm compare ... | head -1`): no traceback. The
        # rest of the output goes to /dev/null so that the exit's own flush does not fail
        # again (the recipe of Python's signal docs, "Note on SIGPIPE"). The exit status is
        # 141 = 128 + SIGPIPE, what a tool killed by the signal (cat, grep) reports: the
        # output was cut short, which `set -o pipefail` scripts can still see.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
    except SystemExit:
        # fire exits 2 after printing the help of a command that takes **options; asking
        # for help is not an error.
        if any(tok in HELP_FLAGS for tok in argv):
            sys.exit(0)
        raise
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    except Stopped as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"dist-lm: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("dist-lm: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a read-only folder, a full disk, a file where a folder goes
        from .fileio import fs_error

        line = fs_error(exc)
        if line is None:
            raise
        _fail(line, UserError.exit_code)


def _fail(message: str, code: int) -> None:
    """The one line of a user's error (naming the rank under torchrun), and the exit."""
    rank = os.environ.get("RANK", "0")
    prefix = "dist-lm: error: " if rank == "0" else f"dist-lm [rank {rank}]: error: "
    print(prefix + message, file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
