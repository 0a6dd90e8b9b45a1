"""`python -m softprompt` is the `softprompt` command."""

import sys

from .cli import main

sys.exit(main())
