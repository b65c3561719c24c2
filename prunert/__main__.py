"""`python -m prunert`: the CLI. Ctrl-C while prunert.cli itself is imported exits 130 too, without a traceback."""

import sys

try:
    from prunert.cli import main
except KeyboardInterrupt:
    print("prunert: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
