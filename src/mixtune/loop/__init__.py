"""The training loop's parts, each a room of its own; `mixtune.train` (the recipe) puts them together.

    schedule.py     lr multiplier per step (warm-up + cosine/linear/constant), total steps, warm-up steps
    stream.py       the endless, resumable stream of shuffled micro-batches; label-token counting
    step.py         one optimizer step: exact-accumulation forward/backward, clipping, update
    evaluation.py   token-weighted eval loss (over ranks too), generations on held-out prompts, their scores
    metrics.py      metrics.jsonl + TensorBoard
    checkpoint.py   atomic checkpoints, resume discovery, the resume config check
    optim.py        the optimizer over the adapter (AdamW fused / 8-bit)
    fit.py          the loop body: steps, logging, eval, checkpoints

Arrows point down: fit -> {step, stream, evaluation, metrics, checkpoint, schedule}; nothing here imports the
verbs (train, eval, generate, merge, inspect, bench) or the CLI.
"""
