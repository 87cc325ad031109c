"""The fixtures of tests/pretrained (tiny random Hugging Face directories), defined in hf_testlib.py."""
from hf_testlib import *  # noqa: F401,F403  (pytest registers the fixtures found here)
