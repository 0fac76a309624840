"""Hyperparameter search on Optuna: `dist-lm sweep STUDY.toml` and `dist-lm sweep report DIR`.

space.py reads and checks a study file, study.py runs the trials (each one a `dist-lm train`
subprocess), report.py turns a study into report.md, best.toml and plots. docs/tuning.md
describes the study file.
"""

from __future__ import annotations

def sweep_command(space: str, target: str | None = None, study_dir: str | None = None,
                  workers: int = 0, trials: int = 0, storage: str | None = None,
                  top: int = 10) -> None:
    """`sweep STUDY.toml` runs or continues a study; `sweep report DIR` reports on one."""
    if space == "report":
        from .report import report_command

        where = target or study_dir
        if not where:
            from ..errors import UserError

            raise UserError("dist-lm sweep report needs the study directory, e.g. "
                            "dist-lm sweep report sweeps/ptb-lr.")
        report_command(where, top=top, storage=storage)
        return
    from .study import sweep_command as run

    if target is not None:
        from ..errors import UserError

        raise UserError(f"unexpected argument {target!r}: give the study directory as --dir.")
    run(space, study_dir=study_dir, workers=workers, trials=trials, storage=storage)
