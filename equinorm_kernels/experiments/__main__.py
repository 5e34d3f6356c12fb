"""``python -m equinorm_kernels.experiments``."""
import sys

from .cli import main

sys.exit(main())
