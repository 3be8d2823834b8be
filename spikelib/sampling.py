"""Choosing the next token from a model's logits (every backend hands them over as NumPy)."""
import numpy as np


def sample_token(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Sample from softmax(logits / temperature), keeping the top_k tokens and the smallest set
    whose probability reaches top_p; temperature 0 picks the argmax."""
    logits = logits.astype(np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k > 0:
        logits[logits < np.sort(logits)[-min(top_k, len(logits))]] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p   # always keeps the most likely
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
