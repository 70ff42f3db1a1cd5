"""`python -m ms2mg_converter` = `ms2mg`."""

from ms2mg_converter.cli.main import entry

entry()
