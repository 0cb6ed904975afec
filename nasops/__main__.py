"""``python -m nasops`` is ``python -m nasops.search``: the search driver."""
from nasops.search import main

if __name__ == "__main__":
    main()
