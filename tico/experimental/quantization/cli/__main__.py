"""``python -m tico.experimental.quantization.cli``: the same as the ``tico-sq`` command."""

import sys

from tico.experimental.quantization.cli.main import main

sys.exit(main())
