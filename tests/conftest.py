"""Shared fixtures. Tiny models come from fixtures_models.py, a live server from fixtures_server.py.

Both files sit beside this one (pytest puts this folder on sys.path), so every test folder shares them.
"""

import os

# Two cores: keep torch from oversubscribing them when tests run beside a server subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_models import *  # noqa: F403
from fixtures_server import *  # noqa: F403
