"""`python -m adapterbench.cli ...`: the same entry point as `python -m adapterbench`."""

from adapterbench.cli.common import main

main()
