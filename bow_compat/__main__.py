"""python -m bow_compat == bow-compat."""

from .cli import main

main()
