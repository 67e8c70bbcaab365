"""`python -m processor` is the `ftjobs` command."""

import sys

from processor.cli import main

sys.exit(main())
