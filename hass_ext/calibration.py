"""Round-cost calibration, measured once per machine and kept on disk.

Sizing the tree for the device (``total_tokens="auto"``) needs the cost of a round here, which only a measurement
gives. Measuring takes a while and its result varies a little from run to run; a choice that flips between runs
changes the sampled text for a given seed. So the measurement is written under ``target.cache_dir()/calibration``
(one small JSON file per device, target, draft, dtype, torch and hass_ext version and build of the compiled
kernels) and read back by later processes: a given seed and options then give the same text on every run. A
rebuilt extension (new kernels, other speeds) measures again.

A cache file that cannot be read, or that belongs to another key, is ignored with a warning and measured again.
``HASS_EXT_RECALIBRATE=1`` (or ``recalibrate=True``) measures again and replaces it.
"""
import functools
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _C  # the compiled kernels, whose build the key names
from ._version import __version__
from .atomic_io import atomic_write_json
from .target import cache_dir

CALIBRATION_FORMAT = 1
RECALIBRATE_ENV = "HASS_EXT_RECALIBRATE"


@dataclass(frozen=True)
class Calibration:
    result: dict         # the measurement (JSON values)
    source: str          # "measured" or "cache"
    path: str            # the cache file
    seconds: float       # time spent measuring (0 when read from the cache)

    def describe(self) -> str:
        if self.source == "cache":
            return f"round costs read from the calibration cache {self.path}"
        return f"round costs measured in {self.seconds:.1f} s, cached in {self.path}"


def device_name(device) -> str:
    """The processor that runs ``device``: the GPU's name, or the CPU's model and the torch thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def fingerprint(obj) -> str:
    """A short stable hash of JSON-able settings (a config dict, a profile)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def target_identity(target) -> dict:
    cfg = target.config.to_dict() if hasattr(target.config, "to_dict") else vars(target.config)
    return {"name": str(target.name), "config": fingerprint(cfg),
            "attention": getattr(target.config, "_attn_implementation", None), "dtype": str(target.dtype)}


def draft_identity(draft) -> Optional[dict]:
    if draft is None:
        return None
    return {"config": fingerprint(draft.config.to_dict()), "tree_vocab": int(draft.tree_vocab_size),
            "dtype": str(draft.dtype)}


@functools.lru_cache(maxsize=1)
def kernels_identity() -> str:
    """The build of the compiled kernels in this process (size and modification time of hass_ext._C's file): a
    rebuild changes it, so costs measured with other kernels are not reused."""
    try:
        st = os.stat(_C.__file__)
    except (OSError, TypeError, AttributeError):
        return "unknown"
    return f"{st.st_size}-{st.st_mtime_ns}"


def calibration_key(kind: str, target, draft=None, **settings) -> dict:
    """What a measurement depends on: the device, the target, the draft, their dtype and the software (torch,
    hass_ext and the build of its kernels)."""
    return {"kind": kind, "device": device_name(target.device), "target": target_identity(target),
            "draft": draft_identity(draft), "torch": torch.__version__, "hass_ext": __version__,
            "kernels": kernels_identity(), "settings": settings}


def _path(key: dict) -> str:
    return os.path.join(cache_dir(), "calibration", f"{key['kind']}-{fingerprint(key)}.json")


def _read(path: str, key: dict) -> Optional[dict]:
    """The cached result for ``key``, or None (with a warning for a file that is there but unusable)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        warnings.warn(f"hass_ext: ignoring the unreadable calibration cache {path} ({e}); measuring again",
                      RuntimeWarning, stacklevel=4)
        return None
    if not (isinstance(doc, dict) and doc.get("format") == CALIBRATION_FORMAT and doc.get("key") == key
            and isinstance(doc.get("result"), dict)):
        warnings.warn(f"hass_ext: ignoring the calibration cache {path}: it was written for other settings or by "
                      f"another version; measuring again", RuntimeWarning, stacklevel=4)
        return None
    return doc["result"]


def calibrated(key: dict, measure: Callable[[Callable[[], None], int], dict], steps: int,
               recalibrate: bool = False, check: Callable[[dict], None] = lambda result: None) -> Calibration:
    """The measurement for ``key``: from the cache, or by calling ``measure(tick, steps)`` (which calls ``tick()``
    after each of its ``steps`` steps, for the progress bar on stderr) and caching what it returns.

    check: raises (KeyError/TypeError/ValueError) for a cached result of the wrong shape, which is then measured
    again."""
    path = _path(key)
    recalibrate = recalibrate or os.environ.get(RECALIBRATE_ENV, "") not in ("", "0")
    if not recalibrate:
        result = _read(path, key)
        if result is not None:
            try:
                check(result)
                return Calibration(result, "cache", path, 0.0)
            except (KeyError, TypeError, ValueError) as e:
                warnings.warn(f"hass_ext: ignoring the calibration cache {path} ({e}); measuring again",
                              RuntimeWarning, stacklevel=3)
    from tqdm.auto import tqdm  # here, not at the top: start-up time of import hass_ext

    start = time.perf_counter()
    with tqdm(total=steps, file=sys.stderr, unit="step", leave=True,
              desc=f"hass_ext: measuring round costs on {key['device']} (once; cached)") as bar:
        result = measure(lambda: bar.update(1), steps)
    seconds = time.perf_counter() - start
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {"format": CALIBRATION_FORMAT, "key": key, "result": result})
    except OSError as e:  # a read-only cache folder costs the measurement next time, nothing else
        warnings.warn(f"hass_ext: could not write the calibration cache {path}: {e}", RuntimeWarning, stacklevel=3)
    return Calibration(result, "measured", path, seconds)
