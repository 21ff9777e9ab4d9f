"""``python -m apr_graph.bench``."""

import sys

from apr_graph.bench.main import main

sys.exit(main())
