"""`python -m pme ...`: the pme command line (see `pme --help`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
