"""``python -m worker.cli`` — the same command as ``semlabel``."""

from .main import main

main()
