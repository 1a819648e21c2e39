"""Evaluate tau and speedup (same as `hass-ext eval`): python python/evaluate.py --draft hass=PATH ..."""
import sys

from hass_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
