import sys

from d2nwg.cli import main

sys.exit(main())
