"""`python -m claas.eval [hydra overrides...]`, the same as `claas eval`."""

import sys

from claas.eval.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
