"""Quality evaluation of a SwiftKV model against its teacher (``swiftkv eval``).

``tasks`` reads benchmark files, ``loglik`` scores continuations for teacher and SwiftKV in one
pass, ``metrics`` turns scores into accuracies and paired intervals, ``distribution`` and
``generation`` hold the KL/perplexity and greedy-generation checks, ``runner`` ties them together.
"""
