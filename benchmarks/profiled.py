"""Run ``python -m MODULE ARGS`` under cProfile in every thread, writing one profile.

    python profiled.py OUT.prof MODULE [ARGS...]

``python -m cProfile`` profiles the main thread only; the API runs its blocking
endpoints (a submit, all of its store and broker work) in a thread pool, which it
would leave out. Each thread started after this gets a profiler of its own; their
figures are added together at exit (the process must exit normally: SIGINT, not
SIGKILL). Thread pool threads still running at exit count up to that moment.
Times are each thread's CPU time (``time.thread_time``), not wall-clock time: waits
for a lock, the GIL or the network do not count.
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import runpy
import sys
import threading
import time

profiles: list[cProfile.Profile] = []


def _start_profiling(*_: object) -> None:
    """The first profile event of a new thread: enabling a profiler of its own replaces
    this hook for that thread (thread pools subclass ``Thread`` and override ``run``,
    so wrapping ``run`` would miss them)."""
    profile = cProfile.Profile(time.thread_time)
    profiles.append(profile)
    profile.enable()


def main() -> None:
    out, module, *args = sys.argv[1:]
    threading.setprofile(_start_profiling)
    main_profile = cProfile.Profile(time.thread_time)

    def write() -> None:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        for profile in profiles:
            try:
                stats.add(profile)
            except TypeError:  # a thread that recorded nothing
                continue
        stats.dump_stats(out)

    atexit.register(write)
    sys.argv = [module, *args]
    main_profile.enable()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
