"""``python -m serving.model_server``: run the protocol-compatible model server."""

import sys

from serving.model_server.server import main

sys.exit(main())
