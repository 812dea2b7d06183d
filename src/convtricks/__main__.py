import sys

from convtricks.cli import main

sys.exit(main())
