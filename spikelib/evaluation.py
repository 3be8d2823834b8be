"""The evaluation text and its figures, the same for every backend: which windows of the
validation split are scored, in what batches, and how a total loss becomes bits per character."""
import math

import numpy as np


def bits_per_char(total_nats, n_chars):
    """BPC = total loss in nats / ln 2 / characters of the evaluated text."""
    return total_nats / math.log(2) / n_chars


def eval_windows(val, context, max_tokens):
    """The first n non-overlapping windows of val, x and y (n, L): as many as max_tokens holds,
    or (max_tokens 0) as many as the split holds."""
    fit = (len(val) - 1) // context
    n = fit if max_tokens == 0 else min(max_tokens // context, fit)
    ids = np.asarray(val[:n * context + 1], dtype=np.int64)
    return ids[:-1].reshape(n, context), ids[1:].reshape(n, context)


def eval_batch(model_context, context):
    """Windows per evaluation batch: 8 at the training context, fewer for longer windows, so the
    (L x L) attention of the parallel form stays as small as in training."""
    return max(1, 8 * model_context ** 2 // context ** 2)


def eval_result(nats, y, decode, context, split_tokens):
    """nats/token, perplexity and BPC of a total loss over the targets y (any shape); BPC counts the
    characters of the evaluated target tokens exactly, by decoding them: len(decode(y)). "whole"
    says whether y is every target of the split (split_tokens of them) or a slice of it."""
    n_chars = len(decode(np.ravel(y).tolist()))
    return {"nats": nats / y.size, "ppl": math.exp(nats / y.size), "bpc": bits_per_char(nats, n_chars),
            "tokens": int(y.size), "chars": n_chars, "context": context,
            "whole": int(y.size) == split_tokens, "split_tokens": split_tokens}


def validation_report(batch_nats, val, context, model_context, max_tokens, decode):
    """Validation figures (eval_result) at the given context, scored in eval_batch-sized batches by
    batch_nats(x, y) -> total nats of targets y; None if val is shorter than one window.

    max_tokens 0 scores the whole split: every window of `context` tokens, then the shorter rest,
    so that every token after the first is a target exactly once (as another model scoring the
    same text at its own context would). Otherwise the first max_tokens // context windows."""
    x, y = eval_windows(val, context, max_tokens)
    if len(x) == 0:
        return None
    batch = eval_batch(model_context, context)
    nats = sum(batch_nats(x[b:b + batch], y[b:b + batch]) for b in range(0, len(x), batch))
    targets = y.ravel()
    rest = np.asarray(val[y.size:], dtype=np.int64)                  # the tail after the last window
    if max_tokens == 0 and len(rest) > 1:
        nats += batch_nats(rest[None, :-1], rest[None, 1:])
        targets = np.concatenate([targets, rest[1:]])
    return eval_result(nats, targets, decode, context, len(val) - 1)
