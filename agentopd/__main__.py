"""``python -m agentopd ...`` (and ``torchrun --nproc-per-node N -m agentopd train --config X.yaml``)."""
import sys

from agentopd.cli import main

if __name__ == "__main__":
    sys.exit(main())
