"""python -m cpuformer.serving MODEL [--host 127.0.0.1] [--port 8000] ..."""
from . import main

raise SystemExit(main())
