"""Entry point of a measurement subprocess: ``python -m benchmarks._worker '{"module", "function", "kwargs"}'``."""

import importlib
import json
import sys

from benchmarks.common import RESULT_PREFIX


def main() -> None:
    spec = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module(f"benchmarks.{spec['module']}"), spec["function"])
    result = fn(**spec["kwargs"])
    # On a line of its own: a progress bar (Rich, tqdm) may have left the cursor mid-line, and the harness
    # only reads a line that starts with the prefix.
    print("\n" + RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
