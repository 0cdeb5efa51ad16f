"""Allow ``python -m cidcapt``; returns cidcapt's exit code to the shell."""

import sys

from cidcapt.main import main

sys.exit(main())
