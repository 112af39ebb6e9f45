"""``python -m tinynet COMMAND ...``: the same program as the installed ``tinynet`` command."""
import sys

from tinynet.commands import main

if __name__ == "__main__":
    sys.exit(main())
