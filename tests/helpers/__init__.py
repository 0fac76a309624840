"""What the tests share, each thing defined once (conftest.py puts tests/ on sys.path):

- corpus: tiny corpora built with the real prepare (a PTB slice, a small generated language),
  reading and damaging shards, AWD-LSTM's reference ids and windows, a loopback HTTP server.
- config: the tiny model sizes, `tiny_config` for Trainer tests, the tiny TOML recipes the CLI
  tests write, the sweep's lr/dropout space.
- cli: running `python -m dist_lm` (and torchrun) in a subprocess with the test environment,
  and checking a bad input's one-line refusal.
- runs: a Trainer, its metrics, a briefly trained run directory for eval, waiting on a process.
- models: the cell search space by brute force, a binomial bound for dropout masks.
- train_entry: a script running one `Trainer(...).fit()` (under torchrun for several ranks).
"""
