import sys
from pathlib import Path

# Test helpers (distributed.py, workers/) are imported by name from this folder.
sys.path.insert(0, str(Path(__file__).parent))
