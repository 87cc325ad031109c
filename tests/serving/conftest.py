"""The fixtures of tests/serving (servers on 127.0.0.1), defined in serving_testlib.py."""
from serving_testlib import *  # noqa: F401,F403  (pytest registers the fixtures found here)
