"""Training metrics, one module per reason to change:

    meter.py      what a log interval measures: tokens/s, data-wait share; ppl or bpc of an NLL
    writer.py     where records go on rank 0: console + tqdm, RUN_DIR/metrics.jsonl, W&B
    baselines.py  single-device tokens/s recorded per configuration (scaling efficiency)
    compare.py    `dist-lm compare`: one table of several runs, and plots against tokens/steps/s
"""
