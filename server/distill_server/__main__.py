"""``python -m distill_server``: the same as ``distill-server``."""

from distill_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
