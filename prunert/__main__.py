import sys

from prunert.cli import main

sys.exit(main())
