"""Test-only: runs at the start-up of a Python process that has this folder on PYTHONPATH.

With AMUSD_TEST_MUTANT set (tests/test_engine_rejection.py does both for the engine workers it
starts), installs that broken rejection verifier (tests/rejection_mutants.py). Nothing else.
"""
import os

if os.environ.get("AMUSD_TEST_MUTANT"):
    from tests.rejection_mutants import install

    install(os.environ["AMUSD_TEST_MUTANT"])
