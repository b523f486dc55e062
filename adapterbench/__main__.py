"""`python -m adapterbench ...` (e.g. under `accelerate launch -m adapterbench extract ...`)."""

from .cli import main

main()
