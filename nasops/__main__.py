"""``python -m nasops`` is ``python -m nasops.search``: the search driver."""
from nasops.search import cli

if __name__ == "__main__":
    cli()
