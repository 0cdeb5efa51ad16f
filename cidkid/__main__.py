"""Allow ``python -m cidkid``."""

import sys

from cidkid.main import main

sys.exit(main())
