"""Parts of the tokenizer trainer (``unitok.tokenizer.train``): run config, data stream, engines,
checkpoints, EMA, optimiser and schedules, and what the run shows while it trains.

Only the trainer imports these; the library modules of ``unitok.tokenizer`` never do.
"""
