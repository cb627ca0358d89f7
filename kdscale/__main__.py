import sys

from kdscale.cli import main

sys.exit(main())
