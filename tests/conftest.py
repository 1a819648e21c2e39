import os
import sys

# Tests import the package from this checkout (built in place or installed editable).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
