"""`python -m irtool ...` runs the command line."""

import sys

from irtool.cli import main

sys.exit(main())
