"""The evaluation text and its figures, the same for every backend: which windows of the
validation split are scored, in what batches, and how a total loss becomes bits per character."""
import math

import numpy as np


def bits_per_char(total_nats, n_chars):
    """BPC = total loss in nats / ln 2 / characters of the evaluated text."""
    return total_nats / math.log(2) / n_chars


def eval_windows(val, context, max_tokens):
    """The fixed evaluation slice: the first n non-overlapping windows of val, x and y (n, L)."""
    n = min(max_tokens // context, (len(val) - 1) // context)
    ids = np.asarray(val[:n * context + 1], dtype=np.int64)
    return ids[:-1].reshape(n, context), ids[1:].reshape(n, context)


def eval_batch(model_context, context):
    """Windows per evaluation batch: 8 at the training context, fewer for longer windows, so the
    (L x L) attention of the parallel form stays as small as in training."""
    return max(1, 8 * model_context ** 2 // context ** 2)


def eval_result(nats, y, decode):
    """nats/token, perplexity and BPC of a total loss over targets y (n, L); BPC counts the
    characters of the evaluated target tokens exactly, by decoding them: len(decode(y))."""
    n_chars = len(decode(y.ravel().tolist()))
    return {"nats": nats / y.size, "ppl": math.exp(nats / y.size), "bpc": bits_per_char(nats, n_chars),
            "tokens": int(y.size), "chars": n_chars, "context": y.shape[1]}


def validation_report(batch_nats, val, context, model_context, max_tokens, decode):
    """Validation figures (eval_result) on the fixed slice of val at the given context, scored in
    eval_batch-sized batches by batch_nats(x, y) -> total nats of targets y; None if empty."""
    x, y = eval_windows(val, context, max_tokens)
    if len(x) == 0:
        return None
    batch = eval_batch(model_context, context)
    nats = sum(batch_nats(x[b:b + batch], y[b:b + batch]) for b in range(0, len(x), batch))
    return eval_result(nats, y, decode)
