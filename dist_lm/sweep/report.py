"""`dist-lm sweep report STUDY_DIR`: report.md, best.toml and PNG plots beside them.

The numbers come from the study's storage; importance is Optuna's PED-ANOVA and fANOVA,
the plots are optuna.visualization.matplotlib's (Agg backend, no display needed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json, write_text_atomic
from .space import dump_toml, load_spec
from .study import SPEC_COPY, STUDY_INFO, open_study, retried_numbers

PLOTS = {  # file -> (title, optuna.visualization.matplotlib function)
    "history.png": ("Optimization history", "plot_optimization_history"),
    "importance-ped-anova.png": ("Importance (PED-ANOVA)", "plot_param_importances"),
    "importance-fanova.png": ("Importance (fANOVA)", "plot_param_importances"),
    "parallel.png": ("Parallel coordinates", "plot_parallel_coordinate"),
    "slice.png": ("Slice plots", "plot_slice"),
    "intermediate.png": ("Validation during the trials (pruned ones stop early)",
                         "plot_intermediate_values"),
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _evaluators():
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    return {"PED-ANOVA": PedAnovaImportanceEvaluator(), "fANOVA": FanovaImportanceEvaluator(seed=0)}


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def importance_target(objective: str):
    """Perplexity is exp(loss): its variance is ruled by the worst trials, so importance and
    the plots use log ppl (the loss); bpc and loss are used as they are."""
    if objective.endswith("ppl"):
        return lambda t: math.log(max(t.value, 1e-300))
    return None


def importances(study, objective: str) -> dict[str, dict[str, float] | str]:
    """{evaluator: {param: importance}} or {evaluator: why it could not be computed}."""
    import optuna

    out: dict[str, dict[str, float] | str] = {}
    for name, ev in _evaluators().items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = optuna.importance.get_param_importances(
                    study, evaluator=ev, target=importance_target(objective))
        except Exception as exc:  # too few trials, a degenerate forest: the report says why
            out[name] = _why(exc)
        else:
            if not out[name]:
                out[name] = "no parameter was sampled in every complete trial"
    return out


@contextlib.contextmanager
def _optuna_quiet_info():
    """Optuna's INFO lines off for the moment (its "A new study created in memory with name:
    ..." for each internal rung study); warnings and errors still show, and the verbosity
    before is restored after. A verbosity already quieter than WARNING is left alone."""
    import optuna

    before = optuna.logging.get_verbosity()
    if before < logging.WARNING:
        optuna.logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def rung_importances(study, objective: str, min_trials: int = 10):
    """Importance at the pruner's rungs: with pruning most trials never complete, so the
    complete ones alone are too few to rank many keys. At each validation step that at least
    `min_trials` trials (complete or pruned) reached, their value at that step is what every
    one of them was judged by; the evaluators rank the keys on those values.

    Returns [(step, n_trials, {evaluator: importances or why not})], earliest step first.
    Optuna's evaluators read only complete trials, so each rung becomes an in-memory study of
    trials created as complete with the rung's value (optuna.trial.create_trial)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    judged = [t for t in study.get_trials(deepcopy=False,
                                          states=(TrialState.COMPLETE, TrialState.PRUNED))
              if t.intermediate_values]
    counts: dict[int, int] = {}
    for t in judged:
        for step in t.intermediate_values:
            counts[step] = counts.get(step, 0) + 1
    out = []
    for step in sorted(s for s, n in counts.items() if n >= min_trials):
        with _optuna_quiet_info():  # the rung's study is ours, not the user's: no log lines
            rung = optuna.create_study(direction="minimize")
            for t in judged:
                value = t.intermediate_values.get(step)
                if value is not None and math.isfinite(value):
                    rung.add_trial(create_trial(params=t.params, distributions=t.distributions,
                                                value=value))
            out.append((step, len(rung.trials), importances(rung, objective)))
    return out


def _plot(study, fname: str, out: Path, objective: str) -> str | None:
    """Draw one plot into out/fname; None on success, else why not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vm

    title, fn = PLOTS[fname]
    kwargs = {}
    if fname.startswith("importance-"):
        kwargs["evaluator"] = _evaluators()["PED-ANOVA" if "ped" in fname else "fANOVA"]
    if importance_target(objective) and fname != "intermediate.png":
        kwargs.update(target=importance_target(objective), target_name=f"log {objective}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = getattr(vm, fn)(study, **kwargs)
            axes = list(ax.flat) if hasattr(ax, "flat") else [ax]
            fig = axes[0].figure
            fig.suptitle(title)
            fig.set_size_inches(max(6.4, 3.6 * len(axes) + 1.5), 4.8)
            fig.tight_layout()
            tmp = out / f".{fname}.{os.getpid()}.png"
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, out / fname)
    except Exception as exc:  # e.g. too few trials for this plot: the report says why
        return _why(exc)
    finally:
        plt.close("all")
    return None


def trial_point(spec, trial) -> dict:
    """A trial's point by config key: the one it ran (user_attrs), else mapped from its Optuna
    params (a key's variant, optim.lr[optim.name=adam], is the key optim.lr)."""
    point = trial.user_attrs.get("point")
    return point if isinstance(point, dict) else spec.point_of(trial.params)


def report_command(study_dir: str, top: int = 10, storage: str | None = None) -> Path:
    """Write STUDY_DIR/report.md (+ best.toml and the plots); returns the report's path."""
    from optuna.trial import TrialState

    sdir = Path(study_dir)
    info_path = sdir / STUDY_INFO
    if not info_path.is_file() or not (sdir / SPEC_COPY).is_file():
        raise UserError(f"{sdir} is not a study directory (no {STUDY_INFO}); give the --dir a "
                        f"`dist-lm sweep` ran in.")
    info = read_json(info_path, "run `dist-lm sweep` again to rewrite it")
    spec = load_spec(sdir / SPEC_COPY, base=info["base"])
    url = storage or info["storage"]
    study = open_study(spec, url, create=False)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = sorted(by_state[TrialState.COMPLETE], key=lambda t: t.value)
    failed = by_state[TrialState.FAIL]
    interrupted = [t for t in failed if t.number in retried]
    objective = complete[0].user_attrs.get("objective", spec.objective) if complete else \
        spec.objective
    keys = spec.keys()

    lines = [f"# Study {spec.name}", "",
             f"Base recipe `{spec.base}`, {spec.budget_text()} per trial, objective "
             f"{objective} (minimised). Storage: `{url}`.", "",
             f"Trials: {len(trials)} — {len(complete)} complete, "
             f"{len(by_state[TrialState.PRUNED])} pruned, {len(failed)} failed"
             f"{f' ({len(interrupted)} of them interrupted and re-queued)' if interrupted else ''}"
             f", {len(by_state[TrialState.RUNNING])} running, "
             f"{len(by_state[TrialState.WAITING])} waiting.", "",
             "## Search space", "", "| key | distribution |", "| --- | --- |"]
    lines += [f"| {p.name} | {p.describe()} |" for p in spec.params]
    if any(p.name != p.key for p in spec.params):
        lines += ["", "A name such as `optim.lr[optim.name=adam]` is the variant of the key that "
                      "is sampled where its condition holds (its own Optuna parameter); the "
                      "tables below show the key's value."]

    if complete:
        best = complete[0]
        point = trial_point(spec, best)
        table = spec.config_table(point)
        table["train.run_dir"] = f"runs/{spec.name}-best"
        header = (f"Best trial of study {spec.name}: trial {best.number}, {objective} = "
                  f"{best.value:.6g} after {spec.budget_text()}.\n"
                  f"Base recipe: {spec.base}; swept: {', '.join(keys)}.\n"
                  f"Reproduce: dist-lm train {sdir / 'best.toml'}")
        write_text_atomic(sdir / "best.toml", dump_toml(table, header))
        lines += ["", "## Best trial", "",
                  f"Trial {best.number}: {objective} = **{best.value:.6g}** "
                  f"(run directory `{best.user_attrs.get('run_dir', '')}`). Its config, ready to "
                  f"train: [best.toml](best.toml) (`dist-lm train {sdir / 'best.toml'}`).", ""]
        lines += ["```toml", *dump_toml({k: table[k] for k in point}).splitlines(), "```"]
        lines += ["", f"## Top {min(top, len(complete))}", "",
                  "| rank | trial | " + objective + " | " + " | ".join(keys) + " | seconds |",
                  "| ---: | ---: | ---: | " + " | ".join("---" for _ in keys) + " | ---: |"]
        for i, t in enumerate(complete[:top]):
            values = trial_point(spec, t)
            secs = (t.datetime_complete - t.datetime_start).total_seconds() \
                if t.datetime_complete and t.datetime_start else math.nan
            lines.append(f"| {i + 1} | {t.number} | {t.value:.5g} | "
                         + " | ".join(_fmt(values.get(k)) for k in keys) + f" | {secs:.0f} |")
    else:
        lines += ["", "No trial has completed yet."]

    lines += ["", "## Hyperparameter importance", "",
              f"Share of the variance of {'log ' if importance_target(objective) else ''}"
              f"{objective} each key explains, over the complete trials (keys sampled in all "
              f"of them)."]
    partial = [p.name for p in spec.params if p.name != p.key]
    if partial:
        lines[-1] += (f" The variants ({', '.join(partial)}) are each sampled only in the trials "
                      f"where their condition holds: an evaluator ranks them on those trials or "
                      f"leaves them out.")
    for name, imp in importances(study, objective).items():
        if isinstance(imp, str):
            lines += ["", f"{name}: not computed ({imp})."]
        else:
            lines += ["", f"| key | {name} |", "| --- | ---: |"]
            lines += [f"| {k} | {v:.3f} |" for k, v in imp.items()]

    if by_state[TrialState.PRUNED]:
        rungs = rung_importances(study, objective)
        if rungs:
            lines += ["", "### At the pruner's rungs (complete and pruned trials)", "",
                      "The value every trial had at the same validation step, for each step "
                      "that at least 10 trials reached: the pruned trials count too."]
        for step, n, by_ev in rungs:
            names = [n_ for n_, imp in by_ev.items() if not isinstance(imp, str)]
            lines += ["", f"Step {step} ({n} trials):", ""]
            for n_, imp in by_ev.items():
                if isinstance(imp, str):
                    lines.append(f"{n_}: not computed ({imp}).")
            if names:
                ks = list(by_ev[names[0]])
                lines += ["| key | " + " | ".join(names) + " |",
                          "| --- | " + " | ".join("---:" for _ in names) + " |"]
                lines += [f"| {k} | " + " | ".join(
                    f"{by_ev[n_][k]:.3f}" if k in by_ev[n_] else "—"  # an evaluator left it out
                    for n_ in names) + " |" for k in ks]
        lines += ["", "## Pruned trials", "", "| trial | last step | last value |",
                  "| ---: | ---: | ---: |"]
        for t in by_state[TrialState.PRUNED]:
            step = max(t.intermediate_values) if t.intermediate_values else None
            value = t.intermediate_values[step] if step is not None else None
            lines.append(f"| {t.number} | {_fmt(step)} | {_fmt(value)} |")
    if failed:
        lines += ["", "## Failed trials", "", "| trial | reason | re-queued |",
                  "| ---: | --- | --- |"]
        for t in failed:
            reason = (t.user_attrs.get("fail_reason") or "").replace("|", "\\|")
            lines.append(f"| {t.number} | {reason} | {'yes' if t.number in retried else ''} |")

    lines += ["", "## Plots", ""]
    for fname, (title, _) in PLOTS.items():
        why = _plot(study, fname, sdir, objective)
        lines.append(f"![{title}]({fname})" if why is None else f"{title}: not drawn ({why}).")
        lines.append("")
    path = write_text_atomic(sdir / "report.md", "\n".join(lines).rstrip() + "\n")
    print(f"dist-lm: wrote {path} ({len(complete)} complete trial(s))"
          + (f"; best config {sdir / 'best.toml'}" if complete else ""))
    return path
