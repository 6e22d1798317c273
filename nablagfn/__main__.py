import sys

from nablagfn.cli import main

sys.exit(main())
