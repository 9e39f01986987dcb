"""Become COMMAND with Linux's parent-death signal set: `python -I -S _deathsig.py SIGNUM PARENT
COMMAND [ARG...]`.

Run by path, not as a module, so that it imports nothing of esper (the interpreter starts in
milliseconds) and `exec`s the command in the same process: the pid the parent holds is the
command's own. The kernel keeps PR_SET_PDEATHSIG across `execve` (set-uid binaries aside).

Why a wrapper and not `preexec_fn`: `preexec_fn` runs Python between `fork` and `exec` of a
threaded parent, which the subprocess docs call unsafe (a lock held by another thread at the fork
stays held forever in the child).
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print("usage: _deathsig.py SIGNUM PARENT_PID COMMAND [ARG...]", file=sys.stderr)
        return 2
    signum, parent, command = int(argv[1]), int(argv[2]), argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    # The parent may have died between our fork and the prctl: then no signal will ever come,
    # and we would run on as an orphan, which is what the signal is there to prevent.
    if os.getppid() != parent:
        return 1
    os.execvp(command[0], command)
    return 1  # not reached: execvp raises or never returns


if __name__ == "__main__":
    sys.exit(main(sys.argv))
