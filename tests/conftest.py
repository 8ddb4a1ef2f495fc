import sys
from pathlib import Path

# `tests.support` holds helpers shared by the test packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
