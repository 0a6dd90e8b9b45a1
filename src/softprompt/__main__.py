"""`python -m softprompt` is the `softprompt` command."""

import sys

from softprompt.cli import main

sys.exit(main())
