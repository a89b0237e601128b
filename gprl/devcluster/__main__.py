"""``python -m gprl.devcluster`` == ``gprl dev-cluster``."""

import sys

from gprl.devcluster.controlplane import main

sys.exit(main())
