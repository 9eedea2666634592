import sys

from robustdrop.cli import main

sys.exit(main())
