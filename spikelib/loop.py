"""The bookkeeping around a training loop, shared by stages 3, 4 and 5.

A stage's `train_step(step)` is the lesson (batch, forward, backward, optimizer update); this
module runs it from `start` to `max_steps` with what every run needs and no run should rewrite:
a progress bar, evaluation and an atomic checkpoint every `eval_interval` steps, a wall-clock
limit, a guard against a non-finite loss, and Ctrl-C that finishes the step under way, saves it
and stops; a SIGTERM (what `kill`, `timeout` and job schedulers send before they kill) does the
same. An interrupt is only acted on between steps, so a checkpoint never holds half an optimizer
update and `--resume 1` continues exactly.
"""
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

from spikelib.metrics import MetricsLog


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM; the loop reads it between steps."""

    def __init__(self):
        self.requested = False


@contextmanager
def interrupts_between_steps(again_quits=True):
    """Within the block the first SIGINT or SIGTERM only sets a flag (the step under way finishes
    and is saved); a second one raises KeyboardInterrupt at once, leaving the last checkpoint as it
    was (unless again_quits is False: under torchrun each process gets the terminal's SIGINT and
    torchrun's copy of it). A scheduler's SIGTERM leaves a grace period before its SIGKILL (SLURM
    30 s, torchrun 30 s, `timeout -k`): time for one step and a save. Outside the main thread
    signals cannot be caught, and both behave as usual."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, frame):
        if stop.requested and again_quits:
            raise KeyboardInterrupt
        stop.requested = True
        what = "interrupt" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{what}: finishing this step, then saving (a second one quits without saving)",
              file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def progress_fields(loss, stats, tokens_per_s):
    """The progress bar's numbers, the same in every stage: loss, learning rate, gradient norm
    (before clipping) and training throughput."""
    return {"loss": f"{loss:.3f}", "lr": f"{stats['lr']:.1e}", "gnorm": f"{stats['grad_norm']:.2f}",
            "tok_s": f"{tokens_per_s:.0f}"}


def run_steps(train_step, start, tcfg, tokens_per_step, evaluate, save, ckpt_path, group=None):
    """Call train_step(step) -> (loss, stats) for step = start .. tcfg.max_steps - 1.

    After a step completes (done = step + 1): every eval_interval steps, at the last step and when
    tcfg.max_minutes has passed, evaluate(done) then save(done); what evaluate returns (a list of
    eval_result dicts) goes to the run's metrics.jsonl beside the checkpoint (spikelib.metrics).
    A non-finite loss raises FloatingPointError before anything is saved. Ctrl-C or SIGTERM: the
    step finishes, save(done), then KeyboardInterrupt. Returns the number of completed steps. With group
    (several processes, spikelib.distributed.Group) only rank 0 shows the bar and writes the log,
    and the ranks stop on the same step: after each step they agree whether any is out of time or
    has seen Ctrl-C or SIGTERM.
    """
    t0, done = time.time(), start
    main_rank = group is None or group.main
    log = MetricsLog(ckpt_path, start) if main_rank else None
    bar = tqdm(total=tcfg.max_steps, initial=start, desc="train", dynamic_ncols=True, disable=not main_rank)
    with interrupts_between_steps(again_quits=group is None) as stop:
        try:
            for step in range(start, tcfg.max_steps):
                loss, stats = train_step(step)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}: stopping without saving; the "
                                             f"last good checkpoint ({ckpt_path}, if any) is kept. "
                                             "Try a lower --lr.")
                done = step + 1
                elapsed = time.time() - t0
                bar.update(1)
                bar.set_postfix(progress_fields(loss, stats, (done - start) * tokens_per_step / elapsed))
                flags = (0 < tcfg.max_minutes < elapsed / 60, stop.requested)
                out_of_time, stopping = flags if group is None else group.any(flags)
                if done % tcfg.eval_interval == 0 or done == tcfg.max_steps or out_of_time:
                    results = evaluate(done)
                    if log:
                        log.add(done, time.time() - t0, results, stats)
                    save(done)
                elif stopping:
                    save(done)
                if stopping:
                    tqdm.write(f"interrupted: saved step {done} to {ckpt_path}; continue with --resume 1")
                    raise KeyboardInterrupt
                if out_of_time:
                    tqdm.write(f"max_minutes={tcfg.max_minutes} reached at step {done}; "
                               "continue with --resume 1")
                    break
        finally:
            bar.close()
    return done
