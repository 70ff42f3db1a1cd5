"""`python -m ms2mg_converter` = `ms2mg`."""

import sys

from ms2mg_converter.cli import main

sys.exit(main())
