"""The fixtures of tests/finetune, defined in ft_testlib.py."""
from ft_testlib import *  # noqa: F401,F403  (pytest registers the fixtures found here)
