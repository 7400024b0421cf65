"""``python -m kubetune_trainer.gpu_check``: the trainer's check on one GPU (``--cpu`` without one).

The check trains a model it builds on the fly against a local S3 server, so it runs from a checkout of the
project (``make gpu-check``), not from the trainer image; it lives in kubetune_devtools with the benchmark.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from kubetune_devtools import gpu_check
    except ImportError as err:
        print(
            f"the GPU check needs a checkout of the project ({err}); run `make gpu-check` from it",
            file=sys.stderr,
        )
        return 2
    return int(gpu_check.main(argv))


if __name__ == "__main__":
    sys.exit(main())
