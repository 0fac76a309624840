"""The run directory: one owner for every writer (`train`, `search`) and reader (`eval`,
`generate`, `score`, `load_run`, `sweep` through its trials).

    RUN/
        config.json      the run's config (with train's "resolved" block)
        vocab.json       a copy of the corpus vocabulary: the run is self-contained
        run.json         the run's identity (its W&B id), created once, kept by every resume
        metrics.jsonl    one JSON record per line
        .lock            one writer at a time
        checkpoints/step-XXXXXXXX/   one step directory per checkpoint, complete once DONE exists

layout.py        step names, the DONE marker and its digests, finding the latest, best and
                 newest whole checkpoint, which weights file a checkpoint stands for
files.py         whole-or-absent writes, reads that never run pickled code, weight loading
directory.py     the lock, the one decision fresh / resume / refuse / overwrite, resume
                 checks, the run's own files; `open_run` is every writer's way in
checkpointer.py  the Checkpointer and its Stateful pieces: what a step directory holds
inference.py     `load_run`: a checkpoint's model, config and tokenizer for inference
stop.py          SIGTERM / SIGINT noted, so a writer checkpoints and stops resumably

Import from the modules (dist_lm.run.layout, ...); this file imports nothing, so reading a
run's layout never pulls in torch.
"""
