"""`python -m corp_cli ...` is `corp ...` (what `torchrun -m corp_cli calibrate ...` runs)."""

from corp_cli.cli import main

main()
