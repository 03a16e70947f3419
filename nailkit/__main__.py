import sys

from nailkit.cli import main

sys.exit(main())
