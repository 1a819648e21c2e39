"""Speed evaluation, tau and speedup over vanilla decoding (same as `hass-ext eval`):

    python python/run_speed_eval.py --draft hass=PATH ...
"""
import sys

from hass_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
