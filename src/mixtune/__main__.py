"""`python -m mixtune VERB ...` — the same entry point as the `mixtune` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
