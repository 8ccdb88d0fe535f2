"""``python -m bench``: the benchmark suite's command line (see :mod:`bench.suite`).

    python -m bench --list                         # names and what each measures
    python -m bench NAME [--smoke] [--record] [--json PATH] [its own arguments...]
    python -m bench NAME --help                    # its own arguments

Each benchmark prints a table and writes a JSON report with the machine's facts, its key
figures (``metrics``) and the floor measured in the same run (``floor``) into
``bench/results/``; ``--record`` also appends one line to ``bench/history.jsonl``. Compare two
reports with ``python -m bench.compare OLD.json NEW.json``.
"""

from __future__ import annotations

import sys

from bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
