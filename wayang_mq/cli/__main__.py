"""``python -m wayang_mq.cli``: the same as the ``wayang-mq`` script."""

import sys

from wayang_mq.cli import main

sys.exit(main())
