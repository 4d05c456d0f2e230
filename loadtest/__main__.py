"""`python -m loadtest ...`: the load generator (see loadtest/cli.py or --help)."""
import sys

from loadtest.cli import main

sys.exit(main())
