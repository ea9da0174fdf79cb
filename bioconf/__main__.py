import sys

from bioconf.cli import main

sys.exit(main())
