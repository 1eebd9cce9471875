"""``python -m medseg`` (also what ``torchrun -m medseg`` runs)."""

from medseg.cli import main

main()
