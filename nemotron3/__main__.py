"""`python -m nemotron3 ...` runs the `nemotron3` command."""

from nemotron3.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
