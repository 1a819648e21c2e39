"""Tree shapes sized for the hardware: a draft's measured acceptance profile x this device's measured costs.

The best tree depends on two things that live in different places:

- how many tokens a round commits with a given shape (total_tokens N, depth D, tree_topk K): a property of the
  draft and the target, not of the device. ``measure_acceptance`` measures it once per draft, by replaying
  greedy decoding on calibration prompts: the target's own greedy continuation is known, so every round's tree is
  built by the real ``draft_tree`` from the real draft cache and the accepted length is read off by matching the
  tree against the continuation; no target forward per round is needed, and the result is the tau that greedy
  speculative decoding gets with that shape. The profile is saved beside the draft (``tree_profile.json``).
- what a round costs here: the draft tree, the target's verification forward over N tokens and the draft's
  context pass, timed on this device with the real functions (``measure_costs``).

``choose_tree`` picks the profiled shape with the most tokens per second, tau / round time, and reports the
expected speedup over vanilla decoding (tau x one vanilla step / one round). A draft without a profile falls back
to sizing N alone from the target's forward cost (``speculative.auto_total_tokens``) with the EAGLE-2 depth and
top-k. Sampling (T > 0) uses the same choice: its acceptance is lower but ranks shapes alike.
"""
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

PROFILE_NAME = "tree_profile.json"
PROFILE_FORMAT = 1

# (total_tokens, depth, tree_topk): chains, small trees for CPUs, the EAGLE-2 trees for GPUs
DEFAULT_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (2, 1, 1), (3, 2, 1), (4, 3, 1), (5, 4, 1), (6, 5, 1), (7, 6, 1),
    (6, 3, 2), (8, 4, 2), (10, 4, 3), (12, 5, 3), (16, 5, 4), (24, 6, 4), (32, 6, 8), (48, 6, 10), (60, 6, 10),
)

log = logging.getLogger("hass_ext")


@dataclass(frozen=True)
class TreeChoice:
    total_tokens: int
    depth: int
    tree_topk: int
    source: str                                # "profile" (chosen from the draft's profile) or "forward-cost"
    expected_tau: Optional[float] = None       # from the profile
    round_ms: Optional[float] = None           # measured here
    vanilla_step_ms: Optional[float] = None    # measured here
    expected_speedup: Optional[float] = None   # tau * vanilla step / round

    def options(self) -> dict:
        return {"total_tokens": self.total_tokens, "depth": self.depth, "tree_topk": self.tree_topk}

    def describe(self) -> str:
        s = f"tree {self.total_tokens} nodes, depth {self.depth}, top-k {self.tree_topk} ({self.source}"
        if self.expected_tau is not None:
            s += f": expected tau {self.expected_tau:.2f}, round {self.round_ms:.1f} ms vs vanilla step " \
                 f"{self.vanilla_step_ms:.1f} ms, expected speedup {self.expected_speedup:.2f}x"
        return s + ")"

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the acceptance profile (per draft) -------------------------------------------------------------------

def _check_shapes(shapes) -> List[Tuple[int, int, int]]:
    from .tree import check_tree_options

    out = []
    for s in shapes:
        n, d, k = (int(x) for x in s)
        check_tree_options(n, d, k)
        out.append((n, d, k))
    if not out:
        raise ValueError("no tree shapes given")
    return out


def accepted_length(tokens: Sequence[int], parents: Sequence[int], continuation: Sequence[int]) -> int:
    """Greedy acceptance of a tree against the known continuation: the length of the longest root path whose
    tokens are ``continuation[0], continuation[1], ...`` (children tried in node order, as verify_tree does)."""
    node, depth = 0, 0
    while depth < len(continuation):
        want = continuation[depth]
        child = next((i for i in range(node + 1, len(tokens)) if parents[i] == node and tokens[i] == want), None)
        if child is None:
            break
        node, depth = child, depth + 1
    return depth


@torch.inference_mode()
def greedy_continuation(target, input_ids: torch.Tensor, max_new_tokens: int):
    """The target's greedy continuation (stops after EOS) and its final-norm features over prompt +
    continuation: ``(tokens [P + m], features [P + m, H])``."""
    from .generate import vanilla_decode

    new = []
    for chunk, _ in vanilla_decode(target, input_ids, max_new_tokens, 0.0, 1.0, 0, None):
        new += chunk
        if chunk[-1] in target.eos_token_ids:
            break
    seq = torch.cat([input_ids[0], torch.tensor(new, dtype=torch.long, device=input_ids.device)])
    return seq, target.prefill(seq[None]).hidden_states[0]


@torch.inference_mode()
def replay_rounds(draft, seq: torch.Tensor, features: torch.Tensor, prompt_len: int, shape) -> List[int]:
    """Accepted draft tokens of every round of greedy speculative decoding of ``seq`` (prompt + the target's
    greedy continuation) with one tree shape, from the draft's real trees and cache (module docstring)."""
    from .tree import draft_tree

    n, d, k = shape
    seq_list = seq.tolist()
    total = len(seq_list)
    cache = draft.new_cache(batch=1, capacity=total + 64)

    def extend(a: int, b: int):  # pairs (features[t], seq[t + 1]) for t in [a, b)
        ids = seq[None, a + 1:b + 1]
        out = draft(ids, features[None, a:b].to(draft.dtype), cache=cache, cache_pos=cache.length)
        cache.length = b
        return out[0, -1]

    root_hidden = extend(0, prompt_len)
    length, accepts = prompt_len, []
    while length < total - 1:  # the root seq[length] is committed; seq[length + 1:] is still to come
        levels = min(d, total - 1 - length - 1)
        tree = draft_tree(draft, cache, root_hidden, seq_list[length], n, levels, k)
        a = accepted_length(tree.tokens.tolist(), tree.parents.tolist(), seq_list[length + 1:length + 1 + levels])
        accepts.append(a)
        root_hidden = extend(length, length + a + 1)
        length += a + 1
    return accepts


def continuations(target, prompts: Iterable, max_new_tokens: int = 128, progress: bool = True) -> list:
    """``(tokens, features, prompt_len)`` of the target's greedy continuation of each prompt (strings, chat
    messages or token ids): what ``measure_acceptance`` replays, computed once for several drafts or shapes."""
    from tqdm.auto import tqdm

    out = []
    for p in tqdm(list(prompts), desc="greedy continuations", unit="prompt", disable=not progress):
        ids = target.encode(p)
        seq, feats = greedy_continuation(target, ids, max_new_tokens)
        out.append((seq, feats, int(ids.shape[1])))
    return out


def replay_tau(draft, conts: Sequence, shape) -> Tuple[List[List[int]], float]:
    """Accept lengths per continuation and the token-weighted tau of one shape over ``continuations(...)``."""
    accepts = [replay_rounds(draft, seq, feats, plen, shape) for seq, feats, plen in conts]
    rounds = sum(len(a) for a in accepts)
    return accepts, (sum(x + 1 for a in accepts for x in a) / rounds if rounds else 1.0)


def measure_acceptance(target, draft, prompts: Iterable, shapes=DEFAULT_SHAPES, max_new_tokens: int = 128,
                       progress: bool = True, conts: Optional[Sequence] = None) -> dict:
    """The draft's acceptance profile: tau (new tokens per verification round) of greedy speculative decoding
    with each tree shape, over the target's greedy continuations of ``prompts`` (strings, chat messages or
    token ids; or ``conts`` from ``continuations``). Returns the profile dict (see ``save_profile``)."""
    from tqdm.auto import tqdm

    from .speculative import resolve_draft

    shapes = _check_shapes(shapes)
    draft = resolve_draft(draft, target)
    if conts is None:
        conts = continuations(target, prompts, max_new_tokens, progress)
    if not conts:
        raise ValueError("measure_acceptance needs at least one calibration prompt")
    rounds = {s: 0 for s in shapes}
    tokens = {s: 0 for s in shapes}
    generated = sum(len(seq) - plen for seq, _, plen in conts)
    for seq, feats, plen in tqdm(conts, desc="tree profile", unit="prompt", disable=not progress):
        for s in shapes:
            acc = replay_rounds(draft, seq, feats, plen, s)
            rounds[s] += len(acc)
            tokens[s] += sum(a + 1 for a in acc)
    return {
        "format": PROFILE_FORMAT,
        "target": str(target.name),
        "prompts": len(conts),
        "max_new_tokens": int(max_new_tokens),
        "generated_tokens": int(generated),
        "shapes": [{"total_tokens": n, "depth": d, "tree_topk": k, "rounds": rounds[(n, d, k)],
                    "tokens": tokens[(n, d, k)],
                    "tau": tokens[(n, d, k)] / rounds[(n, d, k)] if rounds[(n, d, k)] else 1.0}
                   for n, d, k in shapes],
    }


def check_profile(profile, where: str = "tree profile") -> dict:
    """Validate a profile dict (ValueError naming what is wrong)."""
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{where}: not a tree profile of format {PROFILE_FORMAT}")
    shapes = profile.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        raise ValueError(f"{where}: no shapes")
    for s in shapes:
        try:
            _check_shapes([(s["total_tokens"], s["depth"], s["tree_topk"])])
            tau = float(s["tau"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad shape entry {s!r}: {e}") from e
        if not (1.0 <= tau <= s["depth"] + 1) or math.isnan(tau):
            raise ValueError(f"{where}: tau {tau} of {s!r} is outside [1, depth + 1]")
    return profile


def save_profile(profile: dict, draft_dir: str) -> str:
    """Write ``draft_dir/tree_profile.json`` atomically; returns its path."""
    from .train.shards import atomic_write_json

    check_profile(profile)
    path = os.path.join(os.fspath(draft_dir), PROFILE_NAME)
    atomic_write_json(path, profile)
    return path


def load_profile(draft_dir: str) -> Optional[dict]:
    """The profile saved beside a draft, or None when there is none."""
    path = os.path.join(os.fspath(draft_dir), PROFILE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return check_profile(raw, path)


# ---- the costs (per device) -------------------------------------------------------------------------------

@torch.inference_mode()
def measure_costs(target, draft, shapes, taus: Optional[Dict[tuple, float]] = None, context: int = 128,
                  repeats: int = 5) -> Tuple[Dict[tuple, float], float]:
    """Seconds of one round per shape on this device (draft tree + verification forward + the draft's context
    pass over ``round(tau)`` tokens; the median of ``repeats``, shapes timed in turns so a noisy machine affects
    all alike: steadier than the best time, which one lucky run decides) and of one vanilla decode step, after a
    ``context``-token random prompt."""
    from .speculative import Sampling, prefill, verify
    from .tree import draft_tree

    shapes = _check_shapes(shapes)
    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=g).to(target.device)
    state = prefill(target, draft, ids, Sampling(0.0, 1.0, 0, None))
    cache = state.draft_cache
    cache.reserve(cache.length + 128)
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def one_round(shape):
        n, d, k = shape
        tree = draft_tree(draft, cache, state.root_hidden, state.root, n, d, k)
        verify(target, state, tree)
        state.cache.crop(-tree.size)
        m = max(1, round((taus or {}).get(shape, 1.0)))
        feats = torch.zeros(1, m, target.config.hidden_size, dtype=draft.dtype, device=draft.device)
        draft(ids[:, :m], feats, cache=cache, cache_pos=cache.length)

    def step():
        out = target.model(input_ids=ids[:, :1], past_key_values=state.cache, use_cache=True)
        out.logits[:, -1].argmax(-1)
        state.cache.crop(-1)

    times = {s: [] for s in shapes}
    vanilla = []
    for rep in range(repeats + 1):  # the first pass warms up
        v = timed(step)
        rounds = {s: timed(lambda: one_round(s)) for s in shapes}
        if rep:
            vanilla.append(v)
            for s in shapes:
                times[s].append(rounds[s])
    return {s: statistics.median(t) for s, t in times.items()}, statistics.median(vanilla)


# ---- the choice -------------------------------------------------------------------------------------------

_CHOICES: Dict[tuple, TreeChoice] = {}


def _profile_shapes(profile, depth=None, tree_topk=None):
    out = {}
    for s in profile["shapes"]:
        shape = (int(s["total_tokens"]), int(s["depth"]), int(s["tree_topk"]))
        if (depth is None or shape[1] == depth) and (tree_topk is None or shape[2] == tree_topk):
            out[shape] = float(s["tau"])
    return out


def choose_tree(target, draft, depth: Optional[int] = None, tree_topk: Optional[int] = None) -> TreeChoice:
    """The tree for ``draft`` on this device (module docstring); ``depth`` / ``tree_topk`` fix those options and
    choose among the profiled shapes that have them. Measured once per (target, draft, device, threads)."""
    from .speculative import DEFAULT_DEPTH, DEFAULT_TREE_TOPK, auto_total_tokens

    profile = getattr(draft, "tree_profile", None)
    taus = _profile_shapes(profile, depth, tree_topk) if profile else {}
    key = (id(target.model), id(draft), str(target.device), torch.get_num_threads(), depth, tree_topk,
           tuple(sorted(taus.items())))
    if key in _CHOICES:
        return _CHOICES[key]
    if not taus:
        k = tree_topk if tree_topk is not None else DEFAULT_TREE_TOPK
        choice = TreeChoice(auto_total_tokens(target, k), depth if depth is not None else DEFAULT_DEPTH, k,
                            "forward-cost")
    else:
        costs, vanilla = measure_costs(target, draft, list(taus), taus)
        best = max(taus, key=lambda s: (taus[s] / costs[s], -s[0]))
        choice = TreeChoice(*best, source="profile", expected_tau=taus[best], round_ms=costs[best] * 1e3,
                            vanilla_step_ms=vanilla * 1e3, expected_speedup=taus[best] * vanilla / costs[best])
    log.info("hass_ext: %s", choice.describe())
    if choice.expected_speedup is not None and choice.expected_speedup < 1.0:
        import warnings

        warnings.warn(f"hass_ext: with this draft, speculative decoding is expected to be slower than vanilla "
                      f"decoding on this device (best {choice.describe()}): its acceptance is too low for the cost "
                      f"of a round here; a better-trained draft (or a GPU) changes that", stacklevel=3)
    _CHOICES[key] = choice
    return choice
