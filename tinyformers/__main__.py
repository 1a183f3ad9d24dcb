import sys

from tinyformers.cli import main

sys.exit(main())
