"""The trainer: alignment masks vs the reference table, losses, loss decrease, exact resume, checkpoints."""
import json
import os

import pytest
import torch

from hass_ext.draft import apply_rotary, init_draft
from hass_ext.train import TrainConfig, Trainer, prepare_data
from hass_ext.train import trainer as trainer_mod
from hass_ext.train.align import align_forward, alignment_steps, next_level
from hass_ext.train.loss import step_loss, training_pairs, uniform_noise
from train_fixtures import make_records, tiny_target

# Who each query row of the alignment steps attends, L = 6, J = 3 (T = target stream, Di = draft level i).
REFERENCE_TABLE = {
    1: ["T . . . . .", "T T . . . .", "T T T . . .", "T T T T . .", "T T T T T .", "T T T T T T"],
    2: ["D1 . . . . .", "T D1 . . . .", "T T D1 . . .", "T T T D1 . .", "T T T T D1 .", "T T T T T D1"],
    3: ["D2 . . . . .", "D1 D2 . . . .", "T D1 D2 . . .", "T T D1 D2 . .", "T T T D1 D2 .", "T T T T D1 D2"],
}


@pytest.fixture(scope="module")
def target():
    return tiny_target("chatml", seed=1, head_scale=20.0)  # peaky target distributions: something to learn


@pytest.fixture(scope="module")
def data_dir(target, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "d")
    prepare_data(target, make_records(64, seed=11), out, max_len=96, shard_size=16, progress=False)
    return out


def random_draft(target, seed=0, scale=0.15):
    draft = init_draft(target, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the init so the attention pattern shows in the output
        for name, p in draft.named_parameters():
            if p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return draft


def naive_step(draft, ids, streams, rows, leaky):
    """Draft step F written out from a table of attended (stream, column) cells, one query row at a time."""
    layer, B, L, _ = draft.layers[0], *streams[0].shape
    at = layer.self_attn
    nh, nkv, d = at.num_heads, at.num_kv_heads, at.head_dim
    cos, sin = draft.rotary(torch.arange(L))
    a = [draft.project(ids, s) for s in streams]
    x = a[-1]
    q = apply_rotary(at.q_proj(x).view(B, L, nh, d).transpose(1, 2), cos, sin)
    ks = [apply_rotary(at.k_proj(s).view(B, L, nkv, d).transpose(1, 2), cos, sin).repeat_interleave(nh // nkv, 1)
          for s in a]
    vs = [at.v_proj(s).view(B, L, nkv, d).transpose(1, 2).repeat_interleave(nh // nkv, 1) for s in a]
    out = torch.zeros(B, nh, L, d)
    for r, row in enumerate(rows):
        cells = [(0 if name == "T" else int(name[1:]), c) for c, name in enumerate(row.split()) if name != "."]
        s = torch.stack([(q[:, :, r] * ks[i][:, :, c]).sum(-1) * d ** -0.5 for i, c in cells], -1)
        e = s.exp()
        w = e / (e.sum(-1, keepdim=True) + (L - len(cells) if leaky else 0))
        out[:, :, r] = sum(w[..., n, None] * vs[i][:, :, c] for n, (i, c) in enumerate(cells))
    h = x + at.o_proj(out.transpose(1, 2).reshape(B, L, nh * d))
    return layer.mlp_block(h)


@pytest.mark.parametrize("attention", ["proper", "reference"])
def test_alignment_steps_reproduce_the_reference_table(target, attention):
    draft = random_draft(target, seed=3)
    B, L, H = 2, 6, target.config.hidden_size
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, target.config.vocab_size, (B, L), generator=g)
    streams = [torch.randn(B, L, H, generator=g) for _ in range(3)]
    with torch.no_grad():
        for F, rows in REFERENCE_TABLE.items():
            got = align_forward(draft, ids, streams[0], streams[1:F], attention=attention)
            want = naive_step(draft, ids, streams[:F], rows, leaky=attention == "reference")
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_step_one_is_the_inference_forward_and_levels_shift(target):
    draft = random_draft(target, seed=4)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, target.config.vocab_size, (3, 11), generator=g)
    f = torch.randn(3, 11, target.config.hidden_size, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(align_forward(draft, ids, f), draft(ids, f), atol=1e-5, rtol=1e-5)
        preds = list(alignment_steps(draft, ids, f, 3))
        lv1 = next_level(f, preds[0])
        assert torch.equal(lv1[:, 0], f[:, 0]) and torch.equal(lv1[:, 1:], preds[0][:, :-1])
        lv2 = next_level(lv1, preds[1])
        torch.testing.assert_close(preds[2], align_forward(draft, ids, f, [lv1, lv2]))
        assert torch.equal(lv2[:, 0], f[:, 0]) and torch.equal(lv2[:, 1:], preds[1][:, :-1])
    # later steps differ from step 1 (they see the draft's own predictions)
    assert not torch.allclose(preds[1], preds[0])
    with pytest.raises(ValueError, match="levels\\[0\\] has shape"):
        align_forward(draft, ids, f, [f[:, :5]])


def test_training_pairs_and_mask_alignment():
    m = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    att = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    batch = {"input_ids": torch.arange(14).view(2, 7), "hidden_states": torch.randn(2, 7, 4),
             "loss_mask": m, "attention_mask": att}
    p = training_pairs(batch)
    assert torch.equal(p["input_ids"], batch["input_ids"][:, 1:])
    assert torch.equal(p["features"], batch["hidden_states"][:, :-1])
    assert torch.equal(p["target"], batch["hidden_states"][:, 1:])
    # predicted: position t is trained when x_{t+2} is an assistant token
    assert p["loss_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    r = training_pairs(batch, "reference")  # m[t], and never past an example's last target
    assert r["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert p["lengths"].tolist() == [7, 4]
    with pytest.raises(ValueError, match="mask_alignment"):
        training_pairs(batch, "shifted")


def test_uniform_noise_amplitude():
    f = torch.zeros(2, 8, 16)
    g = torch.Generator().manual_seed(0)
    noisy = uniform_noise(f, torch.tensor([512, 128]), 0.2, True, g)
    assert noisy[0].abs().max() <= 0.1 and noisy[0].abs().max() > 0.09
    assert noisy[1].abs().max() <= 0.4 and noisy[1].abs().max() > 0.36
    const = uniform_noise(f, torch.tensor([512, 128]), 0.2, False, torch.Generator().manual_seed(0))
    assert const.abs().max() <= 0.1 and const[1].abs().max() > 0.09


def test_step_loss_matches_its_definition(target):
    g = torch.Generator().manual_seed(1)
    H, V = target.config.hidden_size, target.config.vocab_size
    pred, tgt = torch.randn(2, 5, H, generator=g), torch.randn(2, 5, H, generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.float32)
    W = target.model.lm_head.weight.detach()
    loss, parts = step_loss(pred, tgt, mask, W, topk=4, v_w=1.0, p_w=0.1, topk_w=0.7)
    n = mask.sum() + 1e-5
    lv = (torch.nn.functional.smooth_l1_loss(pred, tgt, reduction="none").mean(-1) * mask).sum() / n
    p = torch.softmax(tgt @ W.T, -1)
    plq = p * torch.log_softmax(pred @ W.T, -1)
    top = torch.zeros_like(p).scatter_(-1, p.topk(4, -1).indices, 1.0)
    ce = -(plq.sum(-1) * mask).sum() / n
    tk = -((plq * top).sum(-1) * mask).sum() / n
    torch.testing.assert_close(loss, lv + 0.1 * ce + 0.7 * tk, atol=1e-5, rtol=1e-5)
    assert parts["tokens"] == 5 and abs(parts["topk"] - float(tk)) < 1e-5
    zero, parts = step_loss(pred.requires_grad_(), tgt, torch.zeros_like(mask), W)
    zero.backward()
    assert float(zero.detach()) == 0.0 and parts["tokens"] == 0 and pred.grad is not None


def cfg(data_dir, out, **kw):
    base = dict(data_dir=data_dir, out_dir=str(out), batch_size=4, lr=2e-3, max_steps=6, warmup_steps=2,
                eval_fraction=0.1, eval_k=3, log_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_config_modes_and_validation(data_dir, tmp_path):
    h = cfg(data_dir, tmp_path)
    assert (h.align_steps, h.topk_w, h.step_weights) == (3, 1.0, [1.0, 1.0, 1.0])
    e = cfg(data_dir, tmp_path, mode="eagle")
    assert (e.align_steps, e.topk_w) == (1, 0.0)
    with pytest.raises(ValueError, match="mode='eagle' is align_steps=1"):
        cfg(data_dir, tmp_path, mode="eagle", align_steps=3)
    with pytest.raises(ValueError, match="step_weights needs 3 values"):
        cfg(data_dir, tmp_path, step_weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="mode must be one of"):
        cfg(data_dir, tmp_path, mode="medusa")
    for bad in (dict(save_every=-1), dict(eval_every=-5), dict(eval_max_examples=-1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 0"):
            cfg(data_dir, tmp_path, **bad)


@pytest.mark.parametrize("mode", ["hass", "eagle"])
def test_a_few_steps_lower_the_loss(target, data_dir, tmp_path, mode):
    t = Trainer(cfg(data_dir, tmp_path / mode, mode=mode, max_steps=12, lr=5e-3, noise_std=0.0, eval_max_examples=8),
                target=target)
    fixed = t._pairs([t.train_set[i] for i in range(4)])

    def loss_on_fixed():
        with torch.no_grad():
            return sum(float(step_loss(p, fixed["target"], fixed["loss_mask"], t.lm_head_weight)[0])
                       for p in alignment_steps(t.draft, fixed["input_ids"], fixed["features"], 3))

    before, eval_before = loss_on_fixed(), t.evaluate()
    final = t.train()
    after = loss_on_fixed()
    assert after < 0.85 * before, (before, after)
    assert final["loss_per_step"][0] < eval_before["loss_per_step"][0]
    assert len(final["acc"]) == 3 and all(0.0 <= a <= 1.0 for a in final["acc"]) and final["chains"] > 0
    log = [json.loads(line) for line in open(tmp_path / mode / "log.jsonl")]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    assert all(len(r["steps"]) == (3 if mode == "hass" else 1) for r in log if r["kind"] == "train")
    lrs = [r["lr"] for r in log if r["kind"] == "train"]
    assert lrs[0] == 0.0 and abs(lrs[2] - 5e-3) < 1e-12 and lrs[-1] < lrs[2]  # warmup, then linear decay
    assert os.path.exists(tmp_path / mode / "draft" / "model.safetensors")
    from hass_ext.draft_io import load_draft

    loaded = load_draft(str(tmp_path / mode / "draft"), target=target)
    for k, v in t.draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_draft_vocab_trains_over_the_hot_rows_and_saves_the_map(target, data_dir, tmp_path):
    """draft_vocab=N: the losses and the eval use the N hot rows of the head, the loss falls, and the exported
    draft carries that hot vocabulary as its token map."""
    from hass_ext.draft_io import load_draft
    from hass_ext.train.token_map import hot_vocabulary, template_token_ids, token_frequencies

    V = int(target.config.vocab_size)
    n = max(12, V // 3)
    t = Trainer(cfg(data_dir, tmp_path, mode="hass", max_steps=10, lr=5e-3, noise_std=0.0, eval_max_examples=8,
                    draft_vocab=n), target=target)
    want = hot_vocabulary(token_frequencies(data_dir, V), n, template_token_ids(target))
    assert torch.equal(t.draft.hot_token_ids, want)
    assert torch.equal(t.loss_head, t.lm_head_weight[want]) and t.loss_head.shape[0] == n
    fixed = t._pairs([t.train_set[i] for i in range(4)])

    def loss_on_fixed():
        with torch.no_grad():
            return sum(float(step_loss(p, fixed["target"], fixed["loss_mask"], t.loss_head)[0])
                       for p in alignment_steps(t.draft, fixed["input_ids"], fixed["features"], 3))

    before = loss_on_fixed()
    final = t.train()
    assert loss_on_fixed() < 0.85 * before
    # the held-out chains start where the data follows the target's real (full-vocabulary) greedy path
    full = Trainer(cfg(data_dir, tmp_path / "full", eval_max_examples=8), target=target).evaluate()
    assert final["chains"] == full["chains"] > 0
    loaded = load_draft(str(tmp_path / "draft"), target=target)
    assert torch.equal(loaded.hot_token_ids, want)
    with pytest.raises(ValueError, match="draft_vocab must be an int >= topk"):
        cfg(data_dir, tmp_path, draft_vocab=3)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        Trainer(cfg(data_dir, tmp_path / "big", draft_vocab=V + 1), target=target)


def test_resume_is_bit_for_bit(target, data_dir, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_every=3, eval_max_examples=2)
    straight = Trainer(cfg(data_dir, tmp_path / "a", **kw), target=target)
    straight.train()

    real = Trainer.train_step
    def crash_at_5(self):  # noqa: E306
        if self.step == 4:
            raise KeyboardInterrupt("simulated")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_5)
    first = Trainer(cfg(data_dir, tmp_path / "b", **kw), target=target)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.setattr(Trainer, "train_step", real)
    ck = tmp_path / "b" / "checkpoints"
    assert json.load(open(ck / "latest.json"))["step"] == 3
    assert not [d for d in os.listdir(ck) if d.startswith(".")]  # no temporary leftovers
    resumed = Trainer(cfg(data_dir, tmp_path / "b", **kw), target=target)
    resumed.train(resume=True)
    assert resumed.step == 6
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # step 4 once, not twice
    log_a = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["loss"] for r in log if r["kind"] == "train"] == [r["loss"] for r in log_a if r["kind"] == "train"]
    for (k, a), b in zip(straight.draft.state_dict().items(), resumed.draft.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # a resume with settings that change the weights is refused
    with pytest.raises(ValueError, match="cannot resume .* different settings .*lr"):
        Trainer(cfg(data_dir, tmp_path / "b", **{**kw, "lr": 1e-3}), target=target).load_checkpoint()


def test_corrupt_checkpoint_is_named(target, data_dir, tmp_path):
    t = Trainer(cfg(data_dir, tmp_path, max_steps=1, eval_max_examples=1), target=target)
    t.train()
    state = os.path.join(t.latest_checkpoint(), trainer_mod.STATE_FILE)
    with open(state, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*step-00000001"):
        Trainer(cfg(data_dir, tmp_path, max_steps=1), target=target).load_checkpoint()


def test_target_mismatch_is_refused(data_dir, tmp_path):
    other = tiny_target("chatml", seed=1, hidden=32)
    with pytest.raises(ValueError, match="does not match the data"):
        Trainer(cfg(data_dir, tmp_path), target=other)


def test_unfinished_data_is_refused(target, tmp_path):
    data = str(tmp_path / "partial")
    prepare_data(target, make_records(32, seed=13), data, max_len=96, shard_size=16, stop_after_shards=1,
                 progress=False)
    with pytest.raises(ValueError, match="is not finished .*run prepare-data again"):
        Trainer(cfg(data, tmp_path / "o"), target=target)


def test_bf16_autocast_is_deterministic_and_finite(target, data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        t = Trainer(cfg(data_dir, tmp_path / name, max_steps=3, autocast="bf16", eval_max_examples=2), target=target)
        final = t.train()
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in t.history if r["kind"] == "train")
        assert all(v == v for v in final["loss_per_step"])
        runs.append(t.draft.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(p.dtype == torch.float32 for p in runs[0].values())  # master weights stay fp32
    with pytest.raises(ValueError, match="autocast must be"):
        cfg(data_dir, tmp_path, autocast="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_with_bf16_autocast(tmp_path):
    gpu_target = tiny_target("chatml", seed=3, hidden=256, head_scale=20.0)  # head_dim 64 for the CUDA kernel
    data = str(tmp_path / "data")
    prepare_data(gpu_target, make_records(40, seed=14), data, max_len=96, shard_size=20, progress=False)
    # lr 1e-3: at 5e-3 this x20-scaled head diverges on the CPU as well (8.07 -> 11.7 after 9 steps; 1e-3: 2.64)
    t = Trainer(cfg(data, tmp_path / "o", max_steps=10, lr=1e-3, noise_std=0.0, eval_max_examples=4),
                target=gpu_target)
    assert t.device.type == "cuda" and t.lm_head_weight.is_cuda
    first = t.train_step()
    for _ in range(8):
        last = t.train_step()
    assert last["loss"] < first["loss"] and all(v == v for v in t.evaluate()["loss_per_step"])


def test_an_existing_run_folder_needs_resume_and_resume_needs_a_checkpoint(target, data_dir, tmp_path):
    kw = dict(max_steps=2, eval_max_examples=1)
    (tmp_path / "empty").mkdir()
    Trainer(cfg(data_dir, tmp_path / "empty", **kw), target=target).train()  # an empty folder is a new run
    log = (tmp_path / "empty" / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a training run .*continue it with --resume .*new --out"):
        Trainer(cfg(data_dir, tmp_path / "empty", **kw), target=target).train()
    assert (tmp_path / "empty" / "log.jsonl").read_text() == log  # nothing mixed in
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(cfg(data_dir, tmp_path / "new", **kw), target=target).train(resume=True)
    assert not (tmp_path / "new" / "log.jsonl").exists()
    # a log without any checkpoint (a run killed before its first one): neither way fits, say so
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="no checkpoint to continue from: remove it"):
        Trainer(cfg(data_dir, tmp_path / "orphan", **kw), target=target).train()
    # "auto" (the recipes' scripts): continue when there is a checkpoint, else start
    auto = Trainer(cfg(data_dir, tmp_path / "auto", **kw), target=target)
    auto.train(resume="auto")
    again = Trainer(cfg(data_dir, tmp_path / "auto", **kw), target=target)
    assert again.train(resume="auto") == auto.history[-1]  # finished: its final evaluation, not a second one
    assert sum(r["kind"] == "eval" for r in again.history) == 1
    with pytest.raises(ValueError, match="resume must be"):
        again.train(resume="yes")


def test_stale_temporaries_are_removed_at_the_start(target, data_dir, tmp_path):
    kw = dict(max_steps=3, save_every=1, eval_max_examples=1)
    Trainer(cfg(data_dir, tmp_path, **{**kw, "max_steps": 1}), target=target).train()
    ck = tmp_path / "checkpoints"
    stale = [ck / ".step-00000002.x1y2", ck / ".step-00000003.z9", tmp_path / ".draft-abc"]
    for d in stale:
        (d / "draft").mkdir(parents=True)
        (d / trainer_mod.STATE_FILE).write_bytes(b"optimizer state")
    (ck / ".latest.json.q.tmp").write_text("{}")
    Trainer(cfg(data_dir, tmp_path, **kw), target=target).train(resume=True)
    assert not [p for p in (ck, tmp_path, tmp_path / "draft") for p in p.iterdir() if p.name.startswith(".")]
    assert json.load(open(ck / "latest.json"))["step"] == 3


def test_changed_max_steps_on_resume_follows_the_new_schedule(target, data_dir, tmp_path, monkeypatch):
    """Resuming with another max_steps: the learning rate from the resumed step on is the schedule of the new
    length (warmup, then linear decay to 0 at the new last step), as in a run started with it."""
    kw = dict(max_steps=6, save_every=3, eval_max_examples=1, lr=2e-3, warmup_steps=2)
    real = Trainer.train_step

    def stop_at_4(self):
        if self.step == 4:
            raise KeyboardInterrupt("simulated")
        return real(self)

    for new_total in (10, 5):
        out = tmp_path / str(new_total)
        monkeypatch.setattr(Trainer, "train_step", stop_at_4)
        with pytest.raises(KeyboardInterrupt):
            Trainer(cfg(data_dir, out, **kw), target=target).train()
        monkeypatch.setattr(Trainer, "train_step", real)
        t = Trainer(cfg(data_dir, out, **{**kw, "max_steps": new_total}), target=target)
        t.train(resume=True)
        assert t.step == new_total
        lrs = {r["step"]: r["lr"] for r in t.history if r["kind"] == "train"}
        assert sorted(lrs) == list(range(1, new_total + 1))
        old = [2e-3 * (k / 2 if k < 2 else (6 - k) / 4) for k in range(3)]  # steps 1-3: the 6-step schedule
        new = [2e-3 * ((new_total - k) / (new_total - 2)) for k in range(3, new_total)]
        assert [lrs[s] for s in range(1, new_total + 1)] == pytest.approx(old + new, rel=1e-12, abs=0)
        straight = Trainer(cfg(data_dir, tmp_path / f"straight{new_total}", **{**kw, "max_steps": new_total}),
                           target=target)
        straight.train()
        assert [r["lr"] for r in straight.history if r["kind"] == "train"][3:] == [lrs[s] for s in
                                                                                  range(4, new_total + 1)]
    with pytest.raises(ValueError, match=r"at step 5, past the 4 steps .*max_steps >= 5"):
        Trainer(cfg(data_dir, tmp_path / "5", **{**kw, "max_steps": 4}), target=target).train(resume=True)


def test_no_held_out_examples_is_said_not_scored_zero(target, data_dir, tmp_path):
    t = Trainer(cfg(data_dir, tmp_path, max_steps=1, eval_fraction=0.01), target=target)  # 64 examples: none held out
    assert len(t.eval_set) == 0
    final = t.train()
    assert final["acc"] is None and final["accepted_per_chain"] is None and final["loss_per_step"] is None
    assert final["examples"] == 0 and final["note"].startswith("no held-out examples")
    some = Trainer(cfg(data_dir, tmp_path / "b", eval_max_examples=2), target=target).evaluate()
    assert some["examples"] == 2 and all(a is None or 0.0 <= a <= 1.0 for a in some["acc"])


def test_heldout_module_and_counts_without_chains():
    from hass_ext.train import heldout

    s = heldout.summarize({"correct": [0, 0], "total": [0, 0], "loss": [1.5, 0.0], "tokens": [3, 0]})
    assert s == {"acc": [None, None], "accepted_per_chain": None, "loss_per_step": [0.5, None], "chains": 0,
                 "tokens": 3}
    with pytest.raises(ImportError):
        import hass_ext.train.evaluate  # noqa: F401  (renamed: four modules were called evaluate)


def test_init_from_a_draft_of_another_size_is_one_line(target, data_dir, tmp_path):
    from hass_ext.draft_io import save_draft

    small = init_draft(tiny_target("chatml", seed=1, hidden=32))
    save_draft(small, str(tmp_path / "small"))
    with pytest.raises(ValueError, match="draft does not match the target") as e:
        Trainer(cfg(data_dir, tmp_path / "o", init_from=str(tmp_path / "small")), target=target)
    assert "\n" not in str(e.value)


def test_every_training_option_has_help():
    import argparse

    from hass_ext.train import cli
    from hass_ext.train.align import ATTENTION_MODES

    sub = argparse.ArgumentParser().add_subparsers()
    parsers = [cli.add_train_parser(sub), cli.add_prepare_data_parser(sub), cli.add_regenerate_parser(sub),
               cli.add_token_map_parser(sub)]
    for p in parsers:
        bare = [a.option_strings for a in p._actions if a.help in (None, "") and a.help != argparse.SUPPRESS]
        assert not bare, f"{p.prog}: options without help: {bare}"
    attention = next(a for a in parsers[0]._actions if "--attention" in a.option_strings)
    assert attention.choices is ATTENTION_MODES  # one list, imported
    save = next(a for a in parsers[0]._actions if "--save-every" in a.option_strings)
    assert save.default == trainer_mod.DEFAULT_SAVE_EVERY > 0 and "0: only at the end" in save.help
