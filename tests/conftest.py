import os
import sys


# Tests import their helpers as `from utils import ...`.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "0")
