"""`python -m adapterbench ...` (e.g. under `accelerate launch -m adapterbench extract ...`)."""

from adapterbench.cli import main

main()
