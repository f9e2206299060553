"""Start a script the way a terminal's foreground job runs.

Children of a background job (``cmd &`` in a non-interactive shell, as CI runs
the suite) inherit an ignored SIGINT, which dualflow's scripts rightly keep
ignored.  Interrupt tests therefore start their subprocess through this
prefix, which restores the default SIGINT/SIGTERM handlers and then execs the
real command (no ``preexec_fn``: the test process has threads).
"""

import sys

WITH_DEFAULT_SIGNALS = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
    " signal.signal(signal.SIGTERM, signal.SIG_DFL);"
    " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]
