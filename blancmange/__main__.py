import sys

from blancmange.main import main

sys.exit(main())
