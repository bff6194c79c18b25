import sys

from hgf.cli import main

sys.exit(main())
