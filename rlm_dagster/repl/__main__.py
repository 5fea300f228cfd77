"""Stage 2 of the REPL worker: ``python -m rlm_dagster.repl POLICY_JSON``.

Started by :mod:`rlm_dagster.repl.sandbox` once the process is confined. The import guard goes in
before anything imports pandas, so the worker's libraries load without ctypes or pyarrow.
"""

import sys

from rlm_dagster.repl import guard

guard.prepare_imports()

from rlm_dagster.repl.worker import main  # noqa: E402 - must load after the guard

main(sys.argv[1])
