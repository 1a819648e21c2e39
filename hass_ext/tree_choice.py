"""Tree shapes sized for the hardware: a draft's measured acceptance profile x this device's measured costs.

The best tree depends on two things that live in different places:

- how many tokens a round commits with a given shape (total_tokens N, depth D, tree_topk K): a property of the
  draft and the target, not of the device. ``measure_acceptance`` measures it once per draft, by replaying
  greedy decoding on calibration prompts: the target's own greedy continuation is known, so every round's tree is
  built by the real ``draft_tree`` from the real draft cache and the accepted length is read off by matching the
  tree against the continuation; no target forward per round is needed, and the result is the tau that greedy
  speculative decoding gets with that shape. The profile is saved beside the draft (``tree_profile.json``).
- what a round costs here: the draft tree, the target's verification forward over N tokens and the draft's
  context pass, timed on this device with the real functions (``measure_costs``). The measurement is cached on
  disk (hass_ext.calibration), so every process on this machine makes the same choice.

``choose_tree`` picks the profiled shape with the most tokens per second, tau / round time, and reports the
expected speedup over vanilla decoding (tau x one vanilla step / one round). A draft without a profile falls back
to sizing N alone from the target's forward cost (``auto_total_tokens``) with the EAGLE-2 depth and top-k.
Sampling (T > 0) uses the same choice: its acceptance is lower but ranks shapes alike. ``resolve_tree`` turns the
options of a ``generate`` call into the shape of its rounds.
"""
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .batch import measure_batch_costs
from .calibration import Calibration, calibrated, calibration_key, fingerprint
from .draft import DraftModel, context_pass
from .draft_io import PROFILE_FORMAT, PROFILE_NAME, resolve_draft  # noqa: F401  (PROFILE_NAME: where it goes)
from .speculative import Sampling, decode_step, initial_state, vanilla_decode, verify
from .timing import median_times, time_call
from .tree import DEFAULT_DEPTH, DEFAULT_TREE_TOPK, check_tree_options, draft_tree

# (total_tokens, depth, tree_topk): chains; shallow wide trees (siblings cost verification rows but no draft
# forward, which is what a CPU affords); small trees for CPUs; the EAGLE-2 trees for GPUs
DEFAULT_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (2, 1, 1), (3, 2, 1), (4, 3, 1), (5, 4, 1), (6, 5, 1), (7, 6, 1),
    (3, 1, 2), (4, 1, 3), (4, 2, 2), (5, 2, 2), (6, 2, 3), (5, 3, 2),
    (6, 3, 2), (8, 4, 2), (10, 4, 3), (12, 5, 3), (16, 5, 4), (24, 6, 4), (32, 6, 8), (48, 6, 10), (60, 6, 10),
)

log = logging.getLogger("hass_ext")


@dataclass(frozen=True)
class TreeChoice:
    total_tokens: int
    depth: int
    tree_topk: int
    source: str                                # "profile" (from the draft's profile), "forward-cost" or "given"
    expected_tau: Optional[float] = None       # from the profile
    round_ms: Optional[float] = None           # measured here
    vanilla_step_ms: Optional[float] = None    # measured here
    expected_speedup: Optional[float] = None   # tau * vanilla step / round
    calibration: Optional[Calibration] = None  # where the round costs came from (sized for the device only)

    def options(self) -> dict:
        return {"total_tokens": self.total_tokens, "depth": self.depth, "tree_topk": self.tree_topk}

    @property
    def vanilla_is_faster(self) -> bool:
        """Whether the measured costs say no tree beats a vanilla step here: an automatic choice then decodes
        without the draft (the same output, sooner)."""
        return self.source == "profile" and self.expected_speedup is not None and self.expected_speedup < 1.0

    def describe(self) -> str:
        s = f"tree {self.total_tokens} nodes, depth {self.depth}, top-k {self.tree_topk} ({self.source}"
        if self.expected_tau is not None:
            s += f": expected tau {self.expected_tau:.2f}, round {self.round_ms:.1f} ms vs vanilla step " \
                 f"{self.vanilla_step_ms:.1f} ms, expected speedup {self.expected_speedup:.2f}x"
        s += ")"
        return s + "; vanilla decoding is faster here: not used" if self.vanilla_is_faster else s

    def to_dict(self) -> dict:
        out = asdict(self)
        out["calibration"] = None if self.calibration is None else {
            "source": self.calibration.source, "path": self.calibration.path, "seconds": self.calibration.seconds}
        return out


# ---- the acceptance profile (per draft) -------------------------------------------------------------------

def _check_shapes(shapes) -> List[Tuple[int, int, int]]:
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
    n, d, k = shape
    seq_list = seq.tolist()
    total = len(seq_list)
    cache = draft.new_cache(batch=1, capacity=total + 64)

    def extend(a: int, b: int):  # pairs (features[t], seq[t + 1]) for t in [a, b), the cache holding a positions
        return context_pass(draft, cache, features[a:b], seq[a + 1:b + 1])

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
    from tqdm.auto import tqdm  # here, not at the top: start-up time of import hass_ext

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
    token ids; or ``conts`` from ``continuations``). Returns the profile dict (``hass_ext.draft_io.save_profile``
    writes it beside the draft)."""
    from tqdm.auto import tqdm  # here, not at the top: start-up time of import hass_ext

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


# ---- the costs (per device) -------------------------------------------------------------------------------

def _no_tick():
    pass


@torch.inference_mode()
def measure_costs(target, draft, shapes, taus: Optional[Dict[tuple, float]] = None, context: int = 128,
                  repeats: int = 5, tick=_no_tick) -> Tuple[Dict[tuple, float], float]:
    """Seconds of one round per shape on this device (draft tree + verification forward + the draft's context
    pass over ``round(tau)`` tokens; the median of ``repeats``, shapes timed in turns so a noisy machine affects
    all alike: steadier than the best time, which one lucky run decides) and of one vanilla decode step, after a
    ``context``-token random prompt. ``tick()`` is called after each of the ``(repeats + 1) * (len(shapes) + 1)``
    timed calls."""
    shapes = _check_shapes(shapes)
    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=g).to(target.device)
    state = initial_state(target, draft, ids, Sampling(0.0, 1.0, 0, None))
    cache = state.draft_cache
    cache.reserve(cache.length + 128)
    dev = target.device

    def one_round(shape):
        n, d, k = shape
        tree = draft_tree(draft, cache, state.root_hidden, state.root, n, d, k)
        verify(target, state, tree)
        state.cache.crop(-tree.size)
        m = max(1, round((taus or {}).get(shape, 1.0)))
        feats = torch.zeros(m, target.config.hidden_size, dtype=draft.dtype, device=draft.device)
        context_pass(draft, cache, feats, ids[0, :m])
        cache.length -= m  # timed only: the context stays as it was

    def step():
        decode_step(target, ids[:, :1], state.cache).argmax(-1)
        state.cache.crop(-1)

    medians = median_times({"vanilla": step, **{s: (lambda s=s: one_round(s)) for s in shapes}}, dev, repeats, tick)
    return {s: medians[s] for s in shapes}, medians["vanilla"]


@torch.inference_mode()
def measure_forwards(target, sizes, context: int = 128, repeats: int = 3, tick=_no_tick) -> Dict[int, float]:
    """Best-of-``repeats`` seconds of a target forward (+ lm_head) over ``size`` tokens after a cached context,
    the sizes timed in turns. ``tick()`` is called after each of the ``(repeats + 1) * len(sizes)`` forwards."""
    from transformers import DynamicCache  # here, not at the top: start-up time of import hass_ext

    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    ctx = torch.randint(0, vocab, (1, context), generator=g).to(target.device)
    cache = DynamicCache(config=target.config)
    target.model.model(input_ids=ctx, past_key_values=cache, use_cache=True)
    best = {s: float("inf") for s in sizes}

    def forward(tokens):
        out = target.model.model(input_ids=tokens, past_key_values=cache, use_cache=True)
        target.model.lm_head(out.last_hidden_state)

    for _ in range(repeats + 1):  # the first pass warms up
        for size in sizes:
            tokens = torch.randint(0, vocab, (1, size), generator=g).to(target.device)
            best[size] = min(best[size], time_call(lambda: forward(tokens), target.device))
            cache.crop(-size)
            tick()
    return best


# ---- the choice -------------------------------------------------------------------------------------------

_AUTO_SIZES = (4, 8, 16, 24, 32, 48, 60)
_CHOICES: Dict[tuple, TreeChoice] = {}
_COST_REPEATS = 5
_FORWARD_REPEATS = 3


def _profile_shapes(profile, depth=None, tree_topk=None):
    out = {}
    for s in profile["shapes"]:
        shape = (int(s["total_tokens"]), int(s["depth"]), int(s["tree_topk"]))
        if (depth is None or shape[1] == depth) and (tree_topk is None or shape[2] == tree_topk):
            out[shape] = float(s["tau"])
    return out


def _round_costs(target, draft, taus: Dict[tuple, float], recalibrate: bool, batch: int = 1):
    """Round costs of the profiled shapes and a vanilla step, measured once per machine (hass_ext.calibration);
    for ``batch`` > 1 rows, of batched rounds and steps (hass_ext.batch.measure_batch_costs)."""
    shapes = sorted(taus)
    settings = {} if batch == 1 else {"batch": batch}
    key = calibration_key("round-costs", target, draft, context=128, repeats=_COST_REPEATS,
                          shapes=[[n, d, k, max(1, round(taus[(n, d, k)]))] for n, d, k in shapes], **settings)

    def measure(tick, steps):
        if batch > 1:
            costs, vanilla = measure_batch_costs(target, draft, shapes, taus, batch, repeats=_COST_REPEATS,
                                                 tick=tick)
        else:
            costs, vanilla = measure_costs(target, draft, shapes, taus, repeats=_COST_REPEATS, tick=tick)
        return {"rounds": [[n, d, k, costs[(n, d, k)]] for n, d, k in shapes], "vanilla": vanilla}

    def check(result):
        got = {(int(n), int(d), int(k)): float(c) for n, d, k, c in result["rounds"]}
        if set(got) != set(shapes) or not all(c > 0 for c in got.values()) or not float(result["vanilla"]) > 0:
            raise ValueError("it does not hold a cost for every shape")

    cal = calibrated(key, measure, (_COST_REPEATS + 1) * (len(shapes) + 1), recalibrate, check)
    costs = {(int(n), int(d), int(k)): float(c) for n, d, k, c in cal.result["rounds"]}
    return costs, float(cal.result["vanilla"]), cal


def _forward_cost_size(target, tree_topk: int, recalibrate: bool, batch: int = 1):
    """The tree size from the target's forward cost (``auto_total_tokens``) and its calibration. A batch of
    ``batch`` rows verifies batch x size tokens per round: that forward's cost decides."""
    sizes = [s for s in _AUTO_SIZES if s >= tree_topk] or [max(_AUTO_SIZES[-1], tree_topk)]
    settings = {} if batch == 1 else {"batch": batch}
    key = calibration_key("forward-cost", target, None, context=128, repeats=_FORWARD_REPEATS, sizes=sizes,
                          **settings)

    def measure(tick, steps):
        times = measure_forwards(target, [batch * s for s in sizes], repeats=_FORWARD_REPEATS, tick=tick)
        return {"forwards": [[s, times[batch * s]] for s in sizes]}

    def check(result):
        got = {int(s): float(t) for s, t in result["forwards"]}
        if set(got) != set(sizes) or not all(t > 0 for t in got.values()):
            raise ValueError("it does not hold a time for every size")

    cal = calibrated(key, measure, (_FORWARD_REPEATS + 1) * len(sizes), recalibrate, check)
    times = {int(s): float(t) for s, t in cal.result["forwards"]}
    return min(sizes, key=lambda s: times[s] / (1 + 0.5 * math.log2(s))), cal


def auto_total_tokens(target, tree_topk: int = DEFAULT_TREE_TOPK, recalibrate: bool = False) -> int:
    """Pick the tree size from the measured cost of a target forward over trees of several sizes on this device.

    Score = forward time / (1 + 0.5 log2 T): the expected tokens per round are assumed to grow with the log of
    the tree size (as the EAGLE-2 measurements do), so a size wins when its forward is not much slower than a
    smaller one's. Measured once per machine (cached on disk) with a 128-token context, the sizes timed in
    turns (so a noisy machine affects all alike); sizes below tree_topk are skipped.
    """
    return _forward_cost_size(target, tree_topk, recalibrate)[0]


def choose_tree(target, draft, depth: Optional[int] = None, tree_topk: Optional[int] = None,
                recalibrate: bool = False, batch: int = 1) -> TreeChoice:
    """The tree for ``draft`` on this device (module docstring); ``depth`` / ``tree_topk`` fix those options and
    choose among the profiled shapes that have them. The costs are measured once per machine and cached on disk
    (``recalibrate=True`` or ``HASS_EXT_RECALIBRATE=1`` measures again); the choice is kept for the process.
    batch: rows decoded together; their round verifies batch x total_tokens tokens, so the costs of batched
    rounds (and steps, for the expected speedup) decide."""
    profile = getattr(draft, "tree_profile", None)
    taus = _profile_shapes(profile, depth, tree_topk) if profile else {}
    key = (id(target.model), id(draft), str(target.device), torch.get_num_threads(), depth, tree_topk,
           fingerprint(sorted(taus.items())), batch)
    if key in _CHOICES and not recalibrate:
        return _CHOICES[key]
    if not taus:
        k = tree_topk if tree_topk is not None else DEFAULT_TREE_TOPK
        size, cal = _forward_cost_size(target, k, recalibrate, batch)
        choice = TreeChoice(size, depth if depth is not None else DEFAULT_DEPTH, k, "forward-cost",
                            calibration=cal)
    else:
        costs, vanilla, cal = _round_costs(target, draft, taus, recalibrate, batch)
        best = max(taus, key=lambda s: (taus[s] / costs[s], -s[0]))
        choice = TreeChoice(*best, source="profile", expected_tau=taus[best], round_ms=costs[best] * 1e3,
                            vanilla_step_ms=vanilla * 1e3, expected_speedup=taus[best] * vanilla / costs[best],
                            calibration=cal)
    log.info("hass_ext: %s", choice.describe())
    if choice.expected_speedup is not None and choice.expected_speedup < 1.0:
        warnings.warn(f"hass_ext: with this draft, speculative decoding is expected to be slower than vanilla "
                      f"decoding on this device (best {choice.describe()}): its acceptance is too low for the cost "
                      f"of a round here, so the automatic tree decodes without the draft (the same output); a "
                      f"better-trained draft, a smaller batch or a GPU changes that", stacklevel=3)
    _CHOICES[key] = choice
    return choice


TREE_OPTIONS = ("total_tokens", "depth", "tree_topk", "recalibrate")


def given_tree(total_tokens="auto", depth: Optional[int] = None, tree_topk: Optional[int] = None,
               recalibrate: bool = False) -> Optional[TreeChoice]:
    """Check the tree options of a call without the target (ValueError naming a bad one): the shape when
    ``total_tokens`` is an int, None for ``"auto"`` (``resolve_tree`` then chooses it for the device)."""
    for name, v in (("depth", depth), ("tree_topk", tree_topk)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(recalibrate, bool):
        raise ValueError(f"recalibrate must be True or False, got {recalibrate!r}")
    if isinstance(total_tokens, str) and total_tokens == "auto":
        return None
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens < 1:
        raise ValueError(f"total_tokens must be an int >= 1 or 'auto', got {total_tokens!r}")
    # a top-k the caller did not give is lowered to fit a small tree; one they gave is checked as it is
    topk = tree_topk if tree_topk is not None else min(DEFAULT_TREE_TOPK, total_tokens)
    choice = TreeChoice(total_tokens, DEFAULT_DEPTH if depth is None else depth, topk, "given")
    check_tree_options(choice.total_tokens, choice.depth, choice.tree_topk)
    return choice


def resolve_tree(target, draft: DraftModel, total_tokens="auto", depth: Optional[int] = None,
                 tree_topk: Optional[int] = None, recalibrate: bool = False, batch: int = 1) -> TreeChoice:
    """The tree shape of a run as a ``TreeChoice`` (checked; ValueError naming a bad option).

    ``total_tokens="auto"`` (the default) chooses the shape for this device (``choose_tree``): from the draft's
    acceptance profile when it has one (``depth`` / ``tree_topk``, when given, are kept), else the size from the
    target's forward cost with depth 6 and top-k 10 unless given. An int ``total_tokens`` is used as given, with
    depth 6 and top-k 10 (the EAGLE-2 settings) unless given; a top-k the caller did not give is lowered to fit
    a smaller tree. recalibrate: measure the round costs again instead of reading the cached ones. batch: the
    number of rows decoded together (the automatic choice weighs the cost of verifying all their trees at once).
    """
    choice = given_tree(total_tokens, depth, tree_topk, recalibrate)
    if choice is None:
        choice = choose_tree(target, draft, depth, tree_topk, recalibrate, batch)
        check_tree_options(choice.total_tokens, choice.depth, choice.tree_topk)
    return choice
