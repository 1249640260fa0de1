"""`python -m dsutil` (and `torchrun -m dsutil`) run the command line."""
from .cli import main

raise SystemExit(main())
