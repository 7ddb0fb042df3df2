"""Allows `python -m abliterate`."""

from abliterate.cli import main

main()
