import sys

from vilbert.cli import main

sys.exit(main())
