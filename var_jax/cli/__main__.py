"""`python -m var_jax.cli ...` runs the var-jax command."""
import sys

from var_jax.cli import main

sys.exit(main())
