"""`python -m effusion ...` is the `effusion` command (also what `torchrun -m effusion` runs)."""

from effusion.cli import main

main()
