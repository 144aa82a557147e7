"""megascope for your own training loop: two lines, nothing else required.

::

    import megascope.api as megascope

    for batch in loader:
        loss = train_step(batch)
        megascope.step(loss=loss, tokens=batch.numel())   # the end of a step

Under ``megascope agent ... -- train.py`` this gives the agent and the dashboard, for every rank: the step, its
loss, its time and tokens/s, a stack dump on demand (the hang diagnosis), "finished" on a clean exit and the
traceback of an unhandled exception. Outside an agent (and without a run directory) every call returns at once
and does nothing (no thread, no file, no signal handler): the same script runs with or without megascope.

Reference
---------
``init(*, run_dir=None, console_every=0, handle_commands=False) -> Run``
    Optional: the first call of any function below makes it. Idempotent (returns the same :class:`Run`; the first
    call's arguments count). Reads the rank, local rank, world size, torch elastic restart count and node from the
    environment torchrun and the agent set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``TORCHELASTIC_RESTART_COUNT``, ``MEGASCOPE_NODE``); outside torchrun it is rank 0 of 1. Call it before the
    loop to time the first step too (a step is timed from the previous ``step()`` or from ``init()``; a first
    step with neither is reported with no time).
    The run is active under an agent (``MEGASCOPE_AGENT_ADDRESS`` set: it connects in the background) or with a
    run directory (``run_dir``, else ``MEGASCOPE_RUN_DIR``: one JSON line per record in
    ``<run_dir>/telemetry/rank<R>.jsonl``, the same records the agent gets). An active run registers a SIGUSR1
    stack dump (faulthandler, written from C so it answers even while the main thread is stuck in a collective; a
    SIGUSR1 handler the script installed before is still called after it) into ``<run_dir>/stacks/rank<R>.txt``
    (without a run directory: ``$TMPDIR/megascope-<uid>/<run id>/stacks/``), chains ``sys.excepthook`` (the
    traceback goes to the agent, then the previous hook runs) and registers ``finish()`` with ``atexit``.
    ``console_every`` prints a one-line step log every N steps (megascope's trainer uses it on rank 0);
    ``handle_commands``: see "Commands" below.
``step(loss=None, tokens=None, *, lr=None, grad_norm=None, samples=None, step=None, **scalars)``
    The end of one training step: reports its number (``step``, default: the previous one plus 1, from 1), its
    wall time since the previous ``step()``/``init()`` and the phases measured within it. ``loss`` may be a float
    or a 0-d tensor: a tensor is read on the background thread (on the CUDA stream current when ``step()`` was
    called, so after the kernels that computed it), never with ``.item()`` on the loop's thread: no device sync
    for the loop. ``tokens`` (an int) gives tokens/s. ``samples`` is
    reported as the scalar ``samples`` (and ``samples_per_second``). Any other keyword is a scalar (a float or a
    0-d tensor) shown beside the step (``StepReport.scalars``); at most :data:`MAX_SCALARS` per step, names of
    at most 128 characters. A value that is not a number (a string, None, a list) is left out, never raised;
    NaN and infinite losses are reported as they are (divergence is worth seeing); non-finite scalars are left out.
``phase(name)``
    A context manager timing part of the step: ``data``, ``forward``, ``backward``, ``optimizer`` and ``comm``
    fill the step-time breakdown (what the straggler diagnosis reads: data wait against compute); any other name
    becomes the scalar ``<name>_seconds``. Phases of one step add up; what falls between them is ``other``.
``batches(iterable)``
    ``for batch in megascope.batches(loader):`` times each ``next()`` as the ``data`` phase.
``comm_hook(ddp_model, group=None)``
    For a ``DistributedDataParallel`` model: registers megascope's gradient all-reduce hook (it averages, as
    DDP's default does) which times every bucket's collective: each step then reports its collectives, the time
    the loop was blocked on them (``comm_wait``, what the straggler diagnosis needs) and a collective counter for
    the hang diagnosis. Call it once, before the first backward; a model that has a comm hook of its own already
    keeps it (the error is counted, not raised). Other parallelisms: on GPU, NCCL's own
    ``TORCH_NCCL_TRACE_BUFFER_SIZE`` (Flight Recorder) records every collective; megascope does not fake it.
``event(text, severity="info")``
    A line in the agent's event log (``severity``: info, warning, error or critical).
``finish()``
    Optional: runs by itself at a clean interpreter exit. Tells the agent this rank finished (unless an unhandled
    exception was reported) and flushes what is queued (a few seconds at most). A script that ends with
    ``sys.exit(N)``, N not 0, should call ``megascope.current().fail(...)`` first, or it is reported finished.
``current() -> Run | None``
    The run ``init()`` made, if any.

Guarantees: no function raises into the training loop (an error is counted in ``Run.errors`` and one warning
goes to stderr); nothing waits on the network (records go on a bounded queue that a background thread drains;
a full queue drops and counts). Cost per ``step()`` to the loop's thread, on a 2-core VM between steps of a 2 ms
sleep (cold caches): about 2.5 us without an agent, 6-7 us with one (the report is built on the background thread,
which the loop does not wake; ``python bench/telemetry_overhead.py --api-only``). Call these from the training
loop's thread.

Commands from the agent (save a checkpoint now, stop at a step boundary) need the loop's cooperation: by
default a script's rank answers each with a refusal that says why, so the operator sees it at once instead of a
timeout; a loop that can act on them (megascope's own trainer, a framework callback) passes
``init(handle_commands=True)`` and reads :meth:`Run.pending_commands`, answering each with :meth:`Run.answer`.

Lower level (:class:`Run`, for megascope's own trainer and the framework callbacks): ``Run.report(step_report)``
sends a complete ``StepReport`` built by the caller; ``Run.emit(event)`` an event built with
``megascope.protos.events.make_event``; ``Run.signal(message)`` a lifecycle signal; ``Run.fail(error)`` the
failure report; ``Run.finish(steps=..., param_digest=...)``; ``Run.close()`` flushes without any signal.
"""

from __future__ import annotations

from megascope.api._run import (
    MAX_SCALARS,
    Run,
    batches,
    comm_hook,
    current,
    event,
    finish,
    init,
    phase,
    step,
)

__all__ = [
    "MAX_SCALARS",
    "Run",
    "batches",
    "comm_hook",
    "current",
    "event",
    "finish",
    "init",
    "phase",
    "step",
]
