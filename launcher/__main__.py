"""``python -m launcher``: see launcher/cli.py."""

import sys

from launcher.cli import main
from launcher.supervise import record_worker_exit

code = main()
record_worker_exit(code)     # a worker the launcher started tells it how it ended (torchrun does not)
sys.exit(code)
