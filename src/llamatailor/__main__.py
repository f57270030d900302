"""`python -m llamatailor`: the same command line, for launchers that start modules (torchrun, accelerate)."""

from llamatailor.cli import app

app()
