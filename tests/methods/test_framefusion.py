"""FrameFusion (llm stage) against an independent loop reference written from the paper / manifest description:
each call of a stepwise run on random clips with drifting hidden states (merges, cascades, top-k merge, prune),
batched and padded clips equal each clip alone, the whole cascade of ``vtoken.reduce``, the budget function, keep
and cost, edge cases, errors, dtypes, knob effects and the adapter's frame-slot map."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vtoken
from vtoken.methods.framefusion import DONE, PHASE, PRUNING, framefusion_step, pruning_ratio
from vtoken.methods.registry import CASCADE_START
from vtoken.models.llm import frame_slots

# ---------------------------------------------------------------------------------------------------------------
# the loop reference (one sample, Python floats and lists)
# ---------------------------------------------------------------------------------------------------------------


def ref_ratio(sparsity: list[float], cost: float, n: int = 28) -> float:
    """The official budget function, with vtoken's clamp where the official code raises (budget spent)."""
    s, tot = 1.0, 0.0
    for x in sparsity:
        s *= 1 - x
        tot += s
    rem = n * cost - tot
    if n - len(sparsity) <= 0:
        return 0.0 if rem >= 0 else 1.0
    q = rem / ((n - len(sparsity)) * s)
    return 0.0 if q > 1 else min(1 - q, 1.0)


class Ref:
    """FrameFusion on one sample: ``x`` a list of float64 rows, ``slots`` their frame slots, ``ids`` their
    original indices; one :meth:`call` per layer boundary."""

    def __init__(self, x: torch.Tensor, slots: list[int], cost: float, th: float, lb: float, n: int = 28):
        self.x = [row.double().clone() for row in x]
        self.slots, self.ids = list(slots), list(range(len(slots)))
        self.cost, self.th, self.lb, self.n = cost, th, lb, n
        self.phase, self.sparsity = "merge", []

    def call(self, attn: dict[int, float] | None) -> tuple[str, float]:
        if self.phase == "done":
            return "nothing", math.nan
        ratio = ref_ratio(self.sparsity, self.cost, self.n)
        if self.phase == "prune":
            k = max(1, round(len(self.x) * (1 - ratio)))
            assert attn is not None
            order = sorted(range(len(self.x)), key=lambda i: (-attn[self.ids[i]], i))[:k]
            self.keep(sorted(order))
            self.phase = "done"
            return "prune", ratio
        tip = sorted((i for i in range(len(self.x)) if self.slots[i] >= 0), key=lambda i: (self.slots[i], i))
        sim = [-2.0] * len(tip)
        for j in range(1, len(tip)):
            if self.slots[tip[j]] == self.slots[tip[j - 1]]:
                a, b = self.x[tip[j - 1]], self.x[tip[j]]
                sim[j] = float(a @ b / (a.norm() * b.norm()))
        merged = [j for j in range(len(tip)) if sim[j] >= self.th]
        above = len(merged) / max(len(tip), 1)
        if above < ratio:
            action = "threshold"
            self.sparsity.append(above)
            if above < self.lb:
                self.phase = "prune"
        else:
            action = "topk"
            k = int(ratio * len(tip))
            merged = sorted(sorted(range(len(tip)), key=lambda j: (-sim[j], j))[:k])
            self.phase = "done"
        chosen, runs = set(merged), {}
        for j in merged:
            d = j - 1
            while d in chosen:
                d -= 1
            runs.setdefault(d, []).append(j)
        for d, members in runs.items():
            total = self.x[tip[d]] + sum(self.x[tip[j]] for j in members)
            self.x[tip[d]] = total / (len(members) + 1)
        gone = {tip[j] for j in merged}
        self.keep([i for i in range(len(self.x)) if i not in gone])
        return action, ratio

    def keep(self, rows: list[int]) -> None:
        self.x = [self.x[i] for i in rows]
        self.slots = [self.slots[i] for i in rows]
        self.ids = [self.ids[i] for i in rows]


ACTION = {0: "threshold", 1: "topk", 2: "prune", -1: "nothing"}


# ---------------------------------------------------------------------------------------------------------------
# data and the stepwise vtoken run
# ---------------------------------------------------------------------------------------------------------------


def clips(frames: list[int], slots: int, d: int = 16, seed: int = 0, static: float = 0.6,
          dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [B, N, D], mask [B, N], slots [B, N])``: clips of ``frames[b]`` frames of ``slots`` tokens, padded
    with whole frames; a ``static`` share of the slots barely changes from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(frames), max(frames)
    base = torch.randn(b, 1, slots, d, generator=g, dtype=torch.float64)
    calm = (torch.rand(b, 1, slots, 1, generator=g) < static).double()
    noise = torch.randn(b, t, slots, d, generator=g, dtype=torch.float64)
    x = base + noise * (0.08 * calm + 1.2 * (1 - calm))
    mask = (torch.arange(t)[None, :, None] < torch.tensor(frames)[:, None, None]).expand(b, t, slots)
    slot = torch.arange(slots).repeat(t).expand(b, t * slots)
    return x.reshape(b, t * slots, d).to(dtype), mask.reshape(b, -1), slot.clone()


def stepwise(x: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor, attn: torch.Tensor, keep, knobs: dict,
             drift: torch.Tensor, calls: int = 12) -> list[dict]:
    """vtoken's stepwise run: one ``vtoken.reduce`` call per boundary, ``drift[c - 1]`` added before call ``c``,
    ``attn [B, N]`` the (fixed) attention of every original token. Per call: the kept original indices, the tokens,
    the actions and budgets."""
    b, n = mask.shape
    state = torch.full((b, 1), CASCADE_START)
    index = torch.arange(n).expand(b, n)
    out = []
    for c in range(calls):
        if c:
            x = x + drift[c - 1].to(x.dtype)
        sig = {"llm_frame_slots": slots, "llm_state": state,
               "llm_attn": gather(attn, index, mask)}
        red = vtoken.reduce(x, keep, "framefusion", mask=mask, **knobs, **sig)
        index = torch.where(red.mask, index.gather(1, red.indices.clamp(min=0)), -1)
        slots = torch.where(red.mask, slots.gather(1, red.indices.clamp(min=0)), -1)
        x, mask, state = red.tokens, red.mask, red.extras["state"]
        out.append({"ids": [row[m].tolist() for row, m in zip(index, mask, strict=True)], "x": x, "mask": mask,
                    "action": red.extras["action"].tolist(), "budget": red.extras["budget"].tolist(),
                    "done": red.extras["done"].tolist(), "red": red})
        if all(out[-1]["done"]):
            break
    return out


def gather(attn: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, attn.gather(1, index.clamp(min=0)), 0.0)


def reference_run(x, mask, slots, attn, cost, th, lb, drift, calls, n_layers=28):
    refs = []
    for b in range(x.shape[0]):
        m = mask[b]
        c = cost[b] if isinstance(cost, list) else cost
        refs.append(Ref(x[b][m], slots[b][m].tolist(), c, th, lb, n_layers))
    per_call = []
    for c in range(calls):
        row = []
        for b, r in enumerate(refs):
            if c:
                r.x = [v + drift[c - 1].double() for v in r.x]
            a = {i: float(attn[b, i]) for i in range(x.shape[1])}
            action, budget = r.call(a)
            row.append((action, budget, list(r.ids), torch.stack(r.x)))
        per_call.append(row)
    return per_call


CASES = [  # frames per clip, slots a frame, cost, S_th, ratio_lower_bound, seed
    ([4, 3, 2], 6, 0.3, 0.6, 0.1, 0),
    ([5, 5], 8, 0.5, 0.9, 0.1, 1),
    ([6, 2, 4], 5, 0.25, 0.5, 0.2, 2),
    ([3, 6], 7, 0.6, 0.8, 0.05, 3),
    ([8], 4, 0.2, 0.95, 0.1, 4),
]


@pytest.mark.parametrize(("frames", "p", "cost", "th", "lb", "seed"), CASES)
def test_stepwise_calls_equal_the_loop_reference(frames, p, cost, th, lb, seed):
    x, mask, slots = clips(frames, p, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    attn = torch.rand(x.shape[:2], generator=g, dtype=torch.float64)
    drift = 0.3 * torch.randn(16, x.shape[-1], generator=g, dtype=torch.float64)
    knobs = {"cost": cost, "similarity_lower_bound": th, "ratio_lower_bound": lb}
    got = stepwise(x, mask, slots, attn, 1.0, knobs, drift)
    want = reference_run(x, mask, slots, attn, cost, th, lb, drift, len(got))
    for c, (call, ref) in enumerate(zip(got, want, strict=True)):
        for b, (action, budget, ids, rows) in enumerate(ref):
            assert ACTION[call["action"][b]] == action, f"call {c} sample {b}"
            assert call["ids"][b] == ids, f"call {c} sample {b}"
            if action != "nothing":
                assert call["budget"][b] == pytest.approx(budget, rel=1e-12, abs=0)
            k = len(ids)
            torch.testing.assert_close(call["x"][b, :k], rows, atol=1e-10, rtol=1e-10)
    assert all(got[-1]["done"]), "the run finishes"


def test_the_reference_cases_cover_every_action():
    seen = set()
    for frames, p, cost, th, lb, seed in CASES:
        x, mask, slots = clips(frames, p, seed=seed)
        g = torch.Generator().manual_seed(seed + 100)
        attn = torch.rand(x.shape[:2], generator=g, dtype=torch.float64)
        drift = 0.3 * torch.randn(16, x.shape[-1], generator=g, dtype=torch.float64)
        run = stepwise(x, mask, slots, attn, 1.0, {"cost": cost, "similarity_lower_bound": th,
                                                   "ratio_lower_bound": lb}, drift)
        for call in run:
            seen |= set(call["action"])
        seen.add(("cascade", sum(1 for call in run if 0 in call["action"]) > 1))
    assert {0, 1, 2, -1, ("cascade", True)} <= seen


def test_batch_with_padded_clips_equals_each_clip_alone():
    x, mask, slots = clips([5, 2, 4], 6, seed=7, dtype=torch.float32)
    attn = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1))
    drift = 0.2 * torch.randn(8, x.shape[-1], generator=torch.Generator().manual_seed(2))
    for keep in (0.3, 9):
        batch = stepwise(x, mask, slots, attn, keep, {}, drift)
        for b in range(3):
            n = int(mask[b].sum())
            alone = stepwise(x[b:b + 1, :n], mask[b:b + 1, :n], slots[b:b + 1, :n], attn[b:b + 1, :n], keep, {}, drift)
            for c, one in enumerate(alone):
                assert batch[c]["ids"][b] == one["ids"][0]
                assert batch[c]["action"][b] == one["action"][0]
                k = len(one["ids"][0])
                torch.testing.assert_close(batch[c]["x"][b, :k], one["x"][0, :k], atol=1e-6, rtol=1e-5)
            assert all(one["done"][0] for one in alone[-1:])


def test_whole_cascade_of_reduce_is_the_stepwise_run_with_identity_layers():
    x, mask, slots = clips([4, 3], 6, seed=3)
    attn = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = stepwise(x, mask, slots, attn, 0.3, {}, torch.zeros(16, x.shape[-1], dtype=torch.float64))
    red = vtoken.reduce(x, 0.3, "framefusion", mask=mask, llm_frame_slots=slots, llm_attn=attn)
    last = run[-1]
    assert [row[m].tolist() for row, m in zip(red.indices, red.mask, strict=True)] == last["ids"]
    torch.testing.assert_close(red.tokens, last["x"])
    assert len(red.extras["steps"]) == len(run)
    # every original token goes to the output token that holds it (or nowhere): merged ones to their run's first
    for b in range(2):
        kept = red.indices[b][red.mask[b]]
        a = red.assign[b]
        assert bool((a[kept] == torch.arange(len(kept))).all())
        joined = (a >= 0) & mask[b]
        assert bool((slots[b][joined] == slots[b][kept[a[joined]]]).all()), "a token joins its own slot"
        assert bool((kept[a[joined]] <= torch.arange(x.shape[1])[joined]).all()), "the earliest member is kept"
    assert bool((red.mask.sum(1) <= torch.tensor([round(0.3 * 24), round(0.3 * 18)])).all())


# ---------------------------------------------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [0.3, 0.5, 0.05, 1.0])
def test_pruning_ratio_is_the_official_formula_in_float64(cost):
    lists = [[], [0.3], [0.29523809523809524, 0.11275337837837837], [0.5, 0.4, 0.3], [0.9, 0.9]]
    for lst in lists:
        merged = torch.tensor([[round(v * 1000) for v in lst] + [0] * (3 - len(lst))])
        visual = torch.tensor([[1000] * 3])
        xs = [round(v * 1000) / 1000 for v in lst]
        ratio, rem = pruning_ratio(merged, visual, torch.tensor([len(lst)]), torch.tensor([cost], dtype=torch.float64),
                                   28)
        assert float(ratio) == ref_ratio(xs, cost)  # bit-identical, the clamp included
        assert (float(rem) < 0) == (28 * cost - sum(math.prod(1 - v for v in xs[:i + 1]) for i in range(len(xs))) < 0)
    ratio, _ = pruning_ratio(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long),
                             torch.tensor([0]), torch.tensor([0.3], dtype=torch.float64), 28)
    assert float(ratio) == 0.7  # the README default: the first call may merge 70 %


def test_keep_is_the_official_cost():
    x, mask, slots = clips([5, 5], 8, seed=11)  # 40 tokens a clip: keep 0.3 -> 12 / 40 = 0.3 exactly
    attn = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    drift = 0.2 * torch.randn(16, x.shape[-1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    by_keep = stepwise(x, mask, slots, attn, 0.3, {}, drift)
    by_cost = stepwise(x, mask, slots, attn, 1.0, {"cost": 0.3}, drift)
    assert [c["ids"] for c in by_keep] == [c["ids"] for c in by_cost]
    assert [c["budget"] for c in by_keep] == [c["budget"] for c in by_cost]


def test_keep_all_is_the_identity_and_fewer_than_keep_reach_the_end():
    x, mask, slots = clips([4, 3], 6, seed=1)
    attn = torch.rand(x.shape[:2], dtype=torch.float64)
    red = vtoken.reduce(x, 1.0, "framefusion", mask=mask, llm_frame_slots=slots, llm_attn=attn)
    assert torch.equal(red.tokens[red.mask], x[mask])
    step = framefusion_step(x, mask.sum(1), slots, mask=mask, attn=attn)  # cost 1: the first call ends it
    assert step.extras["done"].all() and torch.equal(step.tokens[step.mask], x[mask])
    for keep in (0.1, 0.3, 0.7, 5, 11):
        red = vtoken.reduce(x, keep, "framefusion", mask=mask, llm_frame_slots=slots, llm_attn=attn)
        want = vtoken.core.resolve_keep(keep, mask.sum(1))
        assert bool((red.mask.sum(1) <= want).all()) and bool((red.mask.sum(1) >= 1).all())


def test_a_spent_budget_keeps_one_token_instead_of_the_official_error():
    # nothing merges at the first call: its layer alone costs more than 28 * 0.02 layers of the budget
    x, mask, slots = clips([10], 6, seed=4)
    attn = torch.rand(1, 60, dtype=torch.float64)
    assert ref_ratio([0.0], 0.02) == 1.0  # official: ValueError('The cost is too small')
    run = stepwise(x, mask, slots, attn, 1.0, {"cost": 0.02, "similarity_lower_bound": 1.0},
                   torch.zeros(4, 16, dtype=torch.float64))
    assert [c["action"] for c in run] == [[0], [2]]
    assert len(run[-1]["ids"][0]) == 1


def test_unslotted_tokens_never_merge_but_are_pruned():
    x = torch.randn(1, 4, 8, dtype=torch.float64).repeat(1, 3, 1)  # three identical frames of 4
    slots = torch.arange(4).repeat(3)[None].clone()
    slots[0, [1, 5, 9]] = -1  # slot 1 is no frame slot: identical, yet never merged
    attn = torch.linspace(0, 1, 12, dtype=torch.float64)[None]
    step = framefusion_step(x, torch.tensor([12]), slots, state_in=torch.full((1, 1), CASCADE_START),
                            cost=1.0, similarity_lower_bound=0.99)
    assert step.extras["action"].tolist() == [1]  # a top-k merge of 0 tokens (cost 1: nothing may go)
    red = vtoken.reduce(x, 1.0, "framefusion", cost=0.5, similarity_lower_bound=0.99, ratio_lower_bound=0.1,
                        llm_frame_slots=slots, llm_attn=attn, llm_state=torch.full((1, 1), CASCADE_START))
    kept = red.indices[0].tolist()
    assert {1, 5, 9} <= set(kept), "slot -1 tokens are not merged"
    assert red.extras["above_ratio"].tolist() == [6 / 9]
    assert red.extras["similarity"][0, :9].tolist().count(-2.0) == 3


def test_state_layout_and_phases():
    x, mask, slots = clips([3, 2], 5, seed=2)
    red = framefusion_step(x, torch.tensor([5, 4]), slots, mask=mask, state_in=torch.full((2, 1), CASCADE_START),
                           similarity_lower_bound=1.0)
    st = red.extras["state"]
    assert st[:, PHASE].tolist() == [PRUNING, PRUNING]  # nothing this similar: merged 0 < 0.1, prune next
    assert st[:, 1].tolist() == [5, 4] and st[:, 2].tolist() == [15, 10] and st[:, 3].tolist() == [1, 1]
    assert st[:, 4:].tolist() == [[0, 15], [0, 10]]
    red2 = framefusion_step(red.tokens, torch.tensor([5, 4]), slots, mask=red.mask, state_in=st,
                            attn=torch.rand(2, 15, dtype=torch.float64))
    assert red2.extras["state"][:, PHASE].tolist() == [DONE, DONE] and red2.extras["action"].tolist() == [2, 2]
    red3 = framefusion_step(red2.tokens, torch.tensor([5, 4]), slots[:, :red2.tokens.shape[1]], mask=red2.mask,
                            state_in=red2.extras["state"])
    assert red3.extras["action"].tolist() == [-1, -1] and torch.equal(red3.tokens, red2.tokens)


# ---------------------------------------------------------------------------------------------------------------
# errors, dtypes, knobs, schedule
# ---------------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, _, slots = clips([3], 4, seed=0)
    with pytest.raises(ValueError, match=r"give the budget once: keep .*cost=0.3 with keep=1.0"):
        vtoken.reduce(x, 0.5, "framefusion", cost=0.3, llm_frame_slots=slots)
    with pytest.raises(ValueError, match="'llm_attn'"):
        vtoken.reduce(x, 0.5, "framefusion", llm_frame_slots=slots, similarity_lower_bound=1.0)
    with pytest.raises(ValueError, match="llm_frame_slots"):
        vtoken.reduce(x, 0.5, "framefusion")
    with pytest.raises(ValueError, match="cost"):
        vtoken.reduce(x, 1.0, "framefusion", cost=1.5, llm_frame_slots=slots)
    with pytest.raises(ValueError, match="similarity_lower_bound"):
        vtoken.reduce(x, 1.0, "framefusion", similarity_lower_bound=1.5, llm_frame_slots=slots)
    with pytest.raises(TypeError, match="cost_layers"):
        vtoken.reduce(x, 1.0, "framefusion", cost_layers=2.5, llm_frame_slots=slots)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x, mask, slots = clips([4, 3], 6, seed=5)
    attn = torch.rand(x.shape[:2], dtype=torch.float64)
    red = vtoken.reduce(x.to(dtype), 0.4, "framefusion", mask=mask, llm_frame_slots=slots, llm_attn=attn.to(dtype))
    assert red.tokens.dtype == dtype and bool(torch.isfinite(red.tokens.float()).all())
    assert bool((red.mask.sum(1) <= vtoken.core.resolve_keep(0.4, mask.sum(1))).all())
    assert bool(((red.indices >= 0) == red.mask).all())
    if dtype == torch.float64:  # the loop reference, in float64, with identity layers
        cost = [c / n for c, n in zip(vtoken.core.resolve_keep(0.4, mask.sum(1)).tolist(), mask.sum(1).tolist(),
                                      strict=True)]  # keep's share of each clip
        run = reference_run(x, mask, slots, attn, cost, 0.6, 0.1, torch.zeros(8, 16, dtype=torch.float64),
                            len(red.extras["steps"]))
        for b in range(2):
            assert red.indices[b][red.mask[b]].tolist() == run[-1][b][2]
            torch.testing.assert_close(red.tokens[b][red.mask[b]], run[-1][b][3])


def test_knob_effects():
    x, mask, slots = clips([6, 6], 8, seed=9, static=0.7)
    attn = torch.rand(x.shape[:2], dtype=torch.float64)

    def kept(keep=0.5, **knobs):
        red = vtoken.reduce(x, keep, "framefusion", mask=mask, llm_frame_slots=slots, llm_attn=attn, **knobs)
        return red.mask.sum(1), red.extras["steps"]

    assert bool((kept(0.2)[0] < kept(0.6)[0]).all()), "a smaller budget keeps fewer tokens"
    _, loose = kept(similarity_lower_bound=0.5)
    _, strict = kept(similarity_lower_bound=0.999)
    assert bool((loose[0]["above_ratio"] > strict[0]["above_ratio"]).all())
    _, once = kept(ratio_lower_bound=1.0, similarity_lower_bound=0.999)  # one threshold merge, then the prune
    assert [s["action"].tolist() for s in once] == [[0, 0], [2, 2]]


def test_schedule_every_layer_as_a_cascade():
    info = vtoken.get_method("framefusion")
    assert info.stage == "llm" and info.cascade and not info.exact and info.kind == "merge"
    assert info.schedule.plan_layers(4, dict(info.defaults)) == [0, 1, 2, 3]
    counts = info.schedule.plan_counts(torch.tensor([40, 10]), 0.3, torch.tensor([1, 1]), 4, dict(info.defaults))
    assert len(counts) == 4 and all(c.tolist() == [12, 3] for c in counts)
    assert info.defaults == {"cost": None, "similarity_lower_bound": 0.6, "ratio_lower_bound": 0.1,
                             "cost_layers": 28}


def test_frame_slots_of_images_and_clips():
    images = SimpleNamespace(columns=torch.tensor([[1, 2, 3], [0, 1, -1]]), sample=torch.tensor([0, 1]))
    clip = SimpleNamespace(columns=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, -1, -1, -1, -1]]),
                           sample=torch.tensor([0, 1]), extra={"video_grids": torch.tensor([[2, 2, 2], [1, 2, 2]])})
    got = frame_slots(images, clip, 2, 14, torch.device("cpu"))
    assert got[0].tolist() == [-1, 0, 1, 2, -1, 3, 4, 5, 6, 3, 4, 5, 6, -1]
    assert got[1].tolist() == [0, 1, -1, 3, 4, 5, 6] + [-1] * 7  # an image's range spans its padded row
    two = SimpleNamespace(columns=torch.tensor([[0, 1], [2, 3]]), sample=torch.tensor([0, 0]),
                          extra={"video_grids": torch.tensor([[2, 1, 1], [2, 1, 1]])})
    assert frame_slots(None, two, 1, 4, torch.device("cpu"))[0].tolist() == [0, 0, 1, 1]  # two clips: own slots
