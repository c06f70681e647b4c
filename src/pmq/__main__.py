"""``python -m pmq``: the same command as the ``pmq`` console script (see pmq.cli)."""

from pmq.cli import main

if __name__ == "__main__":
    main()
