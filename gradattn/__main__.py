"""``python -m gradattn``: the ``gradattn`` command (:mod:`gradattn.cli`), with its Ctrl-C handling."""

import sys

from gradattn_launcher import main

if __name__ == "__main__":
    sys.exit(main())
