"""``python -m proper_kernels.train --model DIR --data PATH --output OUT`` (see ``-h``)."""
from .cli import main

raise SystemExit(main())
