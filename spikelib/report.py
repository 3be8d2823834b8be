"""What the stages print: streamed text (more to come in this module)."""
import sys


def print_stream(tok, prompt, ids, new_tokens, out=None):
    """Print the prompt, then each new piece of text as soon as it is complete (a byte-level
    token may end mid-character: wait for the rest before printing). Returns the whole text."""
    out = out or sys.stdout
    out.write(prompt)
    ids, shown = list(ids), tok.decode(ids)
    for nxt in new_tokens:
        ids.append(nxt)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):] if text.startswith(shown) else "")
            out.flush()
            shown = text
    out.write("\n")
    return tok.decode(ids)
