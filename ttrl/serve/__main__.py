"""`python -m ttrl.serve [overrides]`: the same as `ttrl-serve`."""

from ttrl.serve.cli import main

main()
